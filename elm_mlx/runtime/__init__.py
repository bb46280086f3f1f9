"""The CPU runtime: device and dtype rules, the BLAS preload, the numpy decoding path."""
