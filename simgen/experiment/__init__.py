"""Experimental images: reading microscope files, the FFT lattice calibration, the 2H
lattice fit of detected columns and the quality figures of a labelled image.

Nothing here needs a network: ``simgen match`` uses it to estimate the acquisition from a
user's image, and ``training.experiments`` to label one.

* :mod:`simgen.experiment.readers`: :func:`read_image` (DM3/DM4, EMD, SER, TIFF, MRC, NPY,
  PNG) with the pixel size in Å;
* :mod:`simgen.experiment.calibration`: pixel size, scan anisotropy and shear from the
  lattice's FFT spots;
* :mod:`simgen.experiment.lattice`: columns placed on the two sublattices, empty sites;
* :mod:`simgen.experiment.quality`: contrast, honeycomb consistency, the quality verdict.
"""
