"""The PyTorch implementation of the arbiter's model and input pipeline.

Import `impls.torch.adapter` for the harness's `Adapter`; this file imports nothing, so
a missing or broken torch never breaks `import impls`.
"""
