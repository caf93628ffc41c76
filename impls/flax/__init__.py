"""JAX / Flax linen + optax: the explicit reference implementation.

Nothing is imported here, so `import impls.flax` never needs JAX; the harness imports
`impls.flax.adapter` lazily and reports an ImportError as a missing framework.
"""
