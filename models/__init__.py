"""The shipped model, as package data so it is found from any directory and in any install.

``models.DEFAULT`` is the path of the Hugging Face checkpoint directory of the shipped
24.4M-parameter block-diffusion model (see models/default/README.md):
``load_pretrained(models.DEFAULT)``.
"""

import os

DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "default")
