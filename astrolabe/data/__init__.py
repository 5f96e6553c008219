"""Data layer: prompt sets, WebDataset rollout shards, zarr column arrays, mp4 encode/decode.

Submodules are imported explicitly (``from astrolabe.data.video import encode_mp4``) so that
``import astrolabe.data`` stays light (no PyAV / zarr / webdataset import cost).
"""
