"""Writers for COLMAP databases and hloc-compatible HDF5 files."""
