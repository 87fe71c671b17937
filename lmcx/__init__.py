"""lmcx: experiments on linear mode connectivity (train, match, interpolate, calibrate, analyse)."""

__version__ = "0.1.0"
