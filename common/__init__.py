"""lstm-suite's shared library: the LSTM layer and the training utilities."""
