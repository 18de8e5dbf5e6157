"""The TensorFlow side: processes the supervisor starts and only talks to through files.

:mod:`.worker` exports a checkpoint (with one module per checkpoint format
under :mod:`.exporters`), :mod:`.validator` loads the export the way TF
Serving does and proves it, :mod:`.zygote` is the process that imports
TensorFlow once and forks both. :mod:`.runtime` is what every child does
first and last (limits, request, result). The supervisor never imports
anything under this package; it names the modules through
:mod:`daemon.protocol`.
"""
