"""Building blocks of the models: tensor-parallel linears, attention, rotary, norms, sampler."""
