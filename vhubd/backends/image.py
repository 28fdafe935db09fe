"""Build a local OCI image layout with the guest agent baked in.

``build_agent_layout(out, base=None)`` writes an OCI layout whose top layer
holds ``blink_agent`` at /opt/blink-agent and whose entrypoint is
``python3 -m blink_agent serve``. With ``base`` (another local OCI layout, e.g.
one with a Python runtime) its layers come first. Reproducible: sorted tar
entries, fixed mtimes and owners, so the same sources give the same digests.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

from .local import agent_pythonpath

AGENT_DIR = "opt/blink-agent"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


def _blob(out: str, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(out, "blobs", "sha256", digest)
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(data)
    return "sha256:" + digest, len(data)


def agent_layer(src: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        entries: list[tuple[str, str | None]] = []
        for root, dirs, files in os.walk(os.path.join(src, "blink_agent")):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            rel = os.path.relpath(root, src)
            entries.append((rel, None))
            entries += [(os.path.join(rel, f), os.path.join(root, f)) for f in sorted(files)
                        if not f.endswith(".pyc")]
        for d in ("opt", AGENT_DIR):
            tf.addfile(_info(d, None))
        for rel, path in sorted(entries):
            name = f"{AGENT_DIR}/{rel}"
            if path is None:
                tf.addfile(_info(name, None))
            else:
                with open(path, "rb") as f:
                    data = f.read()
                tf.addfile(_info(name, len(data)), io.BytesIO(data))
    return buf.getvalue()


def _info(name: str, size: int | None) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    if size is None:
        ti.type = tarfile.DIRTYPE
        ti.mode = 0o755
    else:
        ti.size = size
        ti.mode = 0o644
    return ti


def _read_base(base: str) -> tuple[list[tuple[dict, bytes]], list[str], dict]:
    with open(os.path.join(base, "index.json")) as f:
        index = json.load(f)
    mdesc = index["manifests"][0]

    def blob(desc):
        algo, hexd = desc["digest"].split(":", 1)
        with open(os.path.join(base, "blobs", algo, hexd), "rb") as f:
            return f.read()

    manifest = json.loads(blob(mdesc))
    config = json.loads(blob(manifest["config"]))
    layers = [(d, blob(d)) for d in manifest["layers"]]
    return layers, config.get("rootfs", {}).get("diff_ids", []), config


def build_agent_layout(out: str, base: str | None = None, src: str | None = None) -> str:
    src = src or agent_pythonpath()
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
    layers: list[dict] = []
    diff_ids: list[str] = []
    config: dict = {"architecture": "amd64", "os": "linux", "config": {}}
    if base:
        blayers, bdiffs, config = _read_base(base)
        for desc, data in blayers:
            _blob(out, data)
            layers.append(desc)
        diff_ids = list(bdiffs)
    layer = agent_layer(src)
    digest, size = _blob(out, layer)
    layers.append({"mediaType": LAYER, "digest": digest, "size": size})
    diff_ids.append(digest)
    cfg = dict(config.get("config") or {})
    env = [e for e in cfg.get("Env", []) if not e.startswith("PYTHONPATH=")] + [f"PYTHONPATH=/{AGENT_DIR}"]
    cfg.update({"Env": env, "Entrypoint": ["python3", "-m", "blink_agent", "serve"], "Cmd": None})
    config = {**config, "config": cfg, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cdigest, csize = _blob(out, json.dumps(config, sort_keys=True).encode())
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST,
                "config": {"mediaType": CONFIG, "digest": cdigest, "size": csize}, "layers": layers}
    mdigest, msize = _blob(out, json.dumps(manifest, sort_keys=True).encode())
    with open(os.path.join(out, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [{"mediaType": MANIFEST, "digest": mdigest, "size": msize,
                                                      "annotations": {"org.opencontainers.image.ref.name":
                                                                      "blink-agent"}}]}, f, sort_keys=True)
    with open(os.path.join(out, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion":"1.0.0"}')
    return out
