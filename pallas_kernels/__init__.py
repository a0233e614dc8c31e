"""Pallas GPU kernels for block-diffusion attention, each with a plain-JAX reference.

Arrays in, arrays out: nothing here depends on mage_jax.
"""
