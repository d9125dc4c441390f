"""PyInstaller runtime hook, added by packaging/okng.spec only when torchvision's compiled ops
cannot load in the build environment (PyPI's torchvision is linked against CUDA torch; the
installer ships a CPU torch).

Without its ops library, ``import torchvision`` fails in ``torchvision._meta_registrations``:
that module registers fake-tensor kernels for ``torchvision::nms``/``qnms`` without the
``_has_ops()`` guard its other registrations have. Those kernels exist only for
``torch.compile`` of torchvision's detection ops, which the station never calls (timm imports
torchvision for its norm layers and transforms). Marking the module as loaded lets the rest of
torchvision import; nothing is imported here, so start-up pays nothing.
"""
import sys
import types

sys.modules.setdefault(
    "torchvision._meta_registrations",
    types.ModuleType("torchvision._meta_registrations", "skipped: torchvision ops are not in this CPU bundle"),
)
