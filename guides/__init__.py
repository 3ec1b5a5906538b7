"""The catalogue of amortized guides q(z | x).  Importing it registers them."""
from guides import bernoulli, delta, iaf, lowrank, lstm, normal  # noqa: F401  (registration)
