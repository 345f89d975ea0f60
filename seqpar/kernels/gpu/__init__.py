"""The GPU's kernels, apart from the CPU's: dense blocks through PyTorch's flash kernel (`flash.py`),
decode through a block table (`paged.py`), and its Triton kernel (`triton_decode.py`: split over the
keys, GQA native, in place; run by Triton's interpreter on CPU tensors in the tests)."""
