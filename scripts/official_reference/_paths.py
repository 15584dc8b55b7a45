"""Import helpers: put the official UniFork sources (extracted from the mirror) on sys.path, stub torchvision."""

import os
import sys
import types

UF_SRC = os.environ.get(
    "UF_SRC", "/tmp/uf_src"
)  # `git --git-dir=/work/.mirror/tliby+UniFork/repo archive HEAD | tar x -C $UF_SRC`


def setup(stub_torchvision=True):
    py311_dataclass_compat()
    for p in (UF_SRC, os.path.join(UF_SRC, "unifork"), os.path.join(UF_SRC, "unifork/model/multimodal_encoder")):
        if p not in sys.path:
            sys.path.insert(0, p)
    import transformers  # noqa: F401  (must be imported before the torchvision stub)

    if stub_torchvision and "torchvision" not in sys.modules:
        tv = types.ModuleType("torchvision")
        tr = types.ModuleType("torchvision.transforms")
        fn = types.ModuleType("torchvision.transforms.functional")
        tv.transforms = tr
        tr.functional = fn
        sys.modules.update({"torchvision": tv, "torchvision.transforms": tr, "torchvision.transforms.functional": fn})


def py311_dataclass_compat():
    """configuration_rqtransformer.py uses `block: AttentionBlockConfig = AttentionBlockConfig()` as a dataclass
    default, which Python >= 3.11 rejects (unhashable mutable default). The official env is Python 3.10.
    Make dataclasses hashable by default (unsafe_hash=True) while importing; semantics are otherwise unchanged."""
    import dataclasses
    import functools

    orig = dataclasses.dataclass
    if getattr(orig, "_uf_patched", False):
        return

    @functools.wraps(orig)
    def patched(cls=None, /, **kw):
        def wrap(c):
            if "configuration_rqtransformer" in c.__module__:
                return orig(c, **{"unsafe_hash": True, **kw})
            return orig(c, **kw)

        return wrap(cls) if cls is not None else wrap

    patched._uf_patched = True
    dataclasses.dataclass = patched
