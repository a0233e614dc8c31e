"""Pallas TPU (Mosaic) kernels for block-diffusion attention, each equal to a plain-JAX reference
of the parent package.

Arrays in, arrays out: nothing here depends on mage_jax. Every entry point takes the arguments of
its Triton counterpart in `pallas_kernels` plus ``interpret`` (True: run in Pallas' TPU
interpreter, which works on a CPU).
"""
