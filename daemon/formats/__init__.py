"""Codecs for the files the daemon reads without TensorFlow: standard library only.

CRC-32C (:mod:`.crc32c`), TensorFlow's tensor bundle index (:mod:`.bundle`)
and TFRecord-framed TensorBoard event files (:mod:`.tensorboard`). Both sides
of the process boundary use them; nothing here imports NumPy or TensorFlow
(a test imports the package in a fresh interpreter and checks).
"""
