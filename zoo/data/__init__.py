"""What goes into a model and comes out of it: challenge npz files and atomic writes, users' image formats, THE
preprocessing, overlays, training and calibration samples, and the challenge's scoring (DSC, NSD)."""
