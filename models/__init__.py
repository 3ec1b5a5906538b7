"""The catalogue of generative models p(x | z) p(z).  Importing it registers them."""
from models import decoders, priors, sentence  # noqa: F401  (registration)
