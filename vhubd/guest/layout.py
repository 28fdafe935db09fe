"""OCI image layouts: reproducible layers, and the layout around them.

Owns turning file entries (a ``cpio.Tree``'s, or part of them) into a tar
layer (entries sorted by name, mtime 0, owner root, PAX format) and its
gzip form (mtime 0, no file name, a fixed level: ``gzip_layer``); writing
an image layout (``oci-layout``, ``index.json``, ``blobs/sha256/`` with
the layers, a config and a manifest: ``write``); and reading one back,
checking every digest it follows (``read``). The same entries and config
always give the same digests. Knows nothing of what the layers hold.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import stat
import tarfile

from ..errors import GuestImageError

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = LAYER + "+gzip"
GZIP_LEVEL = 9
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_JSON = 4 << 20  # an index, manifest or config larger than this is not one


@dataclasses.dataclass
class Layer:
    media_type: str
    data: bytes  # the blob as stored (gzip'd for LAYER_GZIP)
    diff_id: str  # sha256 of the uncompressed tar
    comment: str = ""  # what the layer holds (the config's history)

    @property
    def digest(self) -> str:
        return "sha256:" + hashlib.sha256(self.data).hexdigest()


def tar_of(entries: dict[str, tuple[int, bytes]]) -> bytes:
    """A tar of ``entries`` (path -> (mode with file type, data or symlink
    target)): sorted names, mtime 0, root-owned, PAX format."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name in sorted(entries):
            mode, data = entries[name]
            ti = tarfile.TarInfo(name)
            ti.mtime = 0
            ti.uid = ti.gid = 0
            ti.uname = ti.gname = "root"
            ti.mode = stat.S_IMODE(mode)
            if stat.S_ISDIR(mode):
                ti.type = tarfile.DIRTYPE
                tf.addfile(ti)
            elif stat.S_ISLNK(mode):
                ti.type = tarfile.SYMTYPE
                ti.linkname = data.decode()
                tf.addfile(ti)
            else:
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def gzip_layer(entries: dict[str, tuple[int, bytes]], comment: str = "") -> Layer:
    """``entries`` as a gzip'd tar layer (header mtime 0, no file name)."""
    tar = tar_of(entries)
    data = gzip.compress(tar, compresslevel=GZIP_LEVEL, mtime=0)
    return Layer(LAYER_GZIP, data, "sha256:" + hashlib.sha256(tar).hexdigest(), comment)


def _put(out: str, data: bytes) -> tuple[str, int]:
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(out, "blobs", "sha256", digest)
    if not os.path.exists(path):
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.replace(path + ".tmp", path)
    return "sha256:" + digest, len(data)


def _json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def write(out: str, layers: list[Layer], config: dict, ref: str) -> dict:
    """Write the image layout (``layers`` bottom first, ``config`` without
    its rootfs and history, which come from the layers) into directory
    ``out``; returns the manifest's descriptor."""
    os.makedirs(os.path.join(out, "blobs", "sha256"), exist_ok=True)
    descs = []
    for layer in layers:
        digest, size = _put(out, layer.data)
        descs.append({"mediaType": layer.media_type, "digest": digest, "size": size})
    config = {**config, "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
              "history": [{"created_by": layer.comment or "blink build-image"} for layer in layers]}
    cdigest, csize = _put(out, _json(config))
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST,
                "config": {"mediaType": CONFIG, "digest": cdigest, "size": csize}, "layers": descs}
    mdigest, msize = _put(out, _json(manifest))
    desc = {"mediaType": MANIFEST, "digest": mdigest, "size": msize,
            "platform": {"architecture": config.get("architecture", "amd64"), "os": config.get("os", "linux")},
            "annotations": {"org.opencontainers.image.ref.name": ref}}
    with open(os.path.join(out, "index.json"), "wb") as f:
        f.write(_json({"schemaVersion": 2, "mediaType": INDEX, "manifests": [desc]}))
    with open(os.path.join(out, "oci-layout"), "wb") as f:
        f.write(_json({"imageLayoutVersion": "1.0.0"}))
    return desc


@dataclasses.dataclass
class Layout:
    path: str
    manifest_digest: str
    manifest: dict
    config_digest: str
    config: dict

    def blob(self, digest: str) -> bytes:
        return _blob(self.path, digest)

    @property
    def layers(self) -> list[dict]:
        return list(self.manifest.get("layers", []))


def _blob(path: str, digest: object, limit: int | None = None) -> bytes:
    if not isinstance(digest, str) or not DIGEST_RE.fullmatch(digest):
        raise GuestImageError(f"{path}: not a sha256 digest: {str(digest)[:80]!r}")
    file = os.path.join(path, "blobs", "sha256", digest[len("sha256:"):])
    try:
        with open(file, "rb") as f:
            data = f.read(limit + 1 if limit else -1)
    except OSError as exc:
        raise GuestImageError(f"{path}: blob {digest} missing ({exc.strerror})") from None
    if limit and len(data) > limit:
        raise GuestImageError(f"{path}: blob {digest} is larger than {limit} bytes")
    if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
        raise GuestImageError(f"{path}: blob {digest} does not match its digest")
    return data


def _load_json(path: str, data: bytes, what: str) -> dict:
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise GuestImageError(f"{path}: {what} is not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise GuestImageError(f"{path}: {what} is not a JSON object")
    return obj


def read(path: str) -> Layout:
    """The image of the layout in ``path`` (its index's first linux/amd64
    manifest, following a nested index once); ``GuestImageError`` with the
    reason when it is not a valid layout."""
    if not os.path.isfile(os.path.join(path, "oci-layout")):
        raise GuestImageError(f"{path} is not an OCI image layout (no oci-layout file)")
    try:
        with open(os.path.join(path, "index.json"), "rb") as f:
            raw = f.read(MAX_JSON + 1)
    except OSError as exc:
        raise GuestImageError(f"{path}: cannot read index.json ({exc.strerror})") from None
    if len(raw) > MAX_JSON:
        raise GuestImageError(f"{path}: index.json is larger than {MAX_JSON} bytes")
    index = _load_json(path, raw, "index.json")
    for _ in range(2):
        manifests = index.get("manifests")
        if not isinstance(manifests, list) or not manifests or not all(isinstance(m, dict) for m in manifests):
            raise GuestImageError(f"{path}: the index lists no manifest")
        desc = next((m for m in manifests if (m.get("platform") or {}).get("architecture") in (None, "amd64")),
                    manifests[0])
        data = _blob(path, desc.get("digest"), MAX_JSON)
        doc = _load_json(path, data, f"manifest {desc.get('digest')}")
        if doc.get("mediaType") == INDEX or (desc.get("mediaType") == INDEX and "manifests" in doc):
            index = doc
            continue
        config_desc = doc.get("config") or {}
        if not isinstance(config_desc, dict):
            raise GuestImageError(f"{path}: the manifest has no config")
        config = _load_json(path, _blob(path, config_desc.get("digest"), MAX_JSON), "the image config")
        config_digest = str(config_desc["digest"])
        layers = doc.get("layers")
        if not isinstance(layers, list) or not all(isinstance(x, dict) for x in layers):
            raise GuestImageError(f"{path}: the manifest's layers are not a list")
        for layer in layers:
            if not DIGEST_RE.fullmatch(str(layer.get("digest"))):
                raise GuestImageError(f"{path}: a layer has no sha256 digest")
            if not os.path.isfile(os.path.join(path, "blobs", "sha256", layer["digest"][len("sha256:"):])):
                raise GuestImageError(f"{path}: layer blob {layer['digest']} missing")
        return Layout(path, str(desc["digest"]), doc, config_digest, config)
    raise GuestImageError(f"{path}: indexes nested too deep")
