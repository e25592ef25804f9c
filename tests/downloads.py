"""A local download server and tiny archives in the real formats, for the dataset-download tests.

`FileServer` serves bytes on 127.0.0.1 (ephemeral port) with HTTP Range support, counts requests
and the body bytes it sends, and can drop the connection after N bytes of a file's next answer.
The archive writers build CIFAR-100's python tar.gz, imagenet-r.tar and CUB_200_2011.tgz with the
real member layout but a few tiny images per class, so that readers and a whole run use them as
they would use the real downloads.
"""

import collections
import dataclasses
import hashlib
import io
import pickle
import socket
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
from PIL import Image

from calfuse_jax.data import class_names as names_lib
from calfuse_jax.data import registry


class FileServer:
    """`files` ({name: bytes}) at `<url>/<name>`; a context manager that stops by itself."""

    def __init__(self, files: dict[str, bytes]):
        self.files = dict(files)
        self.requests: list[tuple[str, str | None]] = []  # (name, Range header)
        self.sent: collections.Counter = collections.Counter()  # body bytes sent, per name
        self.cut_after: dict[str, int] = {}  # name -> bytes sent before dropping its next answer
        self.ignore_range = False  # answer 200 with the whole file even to a Range request
        self.delay = 0.0  # seconds before each body, so that concurrent clients overlap
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _handler(server: FileServer):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (http.server's name)
            name = self.path.lstrip("/")
            asked = self.headers.get("Range")
            server.requests.append((name, asked))
            data = server.files.get(name)
            if data is None:
                self.send_error(404)
                return
            start = 0
            if asked and not server.ignore_range:
                start = int(asked.removeprefix("bytes=").split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            time.sleep(server.delay)
            cut = server.cut_after.pop(name, None)
            server.sent[name] += len(body[:cut])  # before the write: the client may finish first
            self.wfile.write(body[:cut])
            if cut is not None:  # the client sees a connection broken mid-body
                self.wfile.flush()
                self.connection.shutdown(socket.SHUT_RDWR)

        def log_message(self, *args):  # keep the test output clean
            pass

    return Handler


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def publish(monkeypatch, name: str, data: bytes) -> None:
    """Makes dataset `name`'s archive (`<dataset>_split`: its published split list) expect `data`
    (the real files cannot be served here)."""
    dataset, split_list, _ = name.partition("_split")
    entry = registry.DATASETS[dataset]

    def expecting(resource):
        return dataclasses.replace(resource, checksum=sha256(data), algorithm="sha256")

    if split_list:
        lists = {protocol: expecting(r) for protocol, r in entry.split_lists.items()}
        entry = dataclasses.replace(entry, split_lists=lists)
    else:
        entry = dataclasses.replace(entry, archive=expecting(entry.archive))
    monkeypatch.setitem(registry.DATASETS, dataset, entry)


def tar_bytes(members: dict[str, bytes], mode: str = "w:gz", links=()) -> bytes:
    """A tar archive of `members` ({path: content}) plus `links` ((path, target, symbolic))."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for path, content in members.items():
            info = tarfile.TarInfo(path)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
        for path, target, symbolic in links:
            info = tarfile.TarInfo(path)
            info.type = tarfile.SYMTYPE if symbolic else tarfile.LNKTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


def jpeg(value: int) -> bytes:
    """A tiny solid JPEG; `value` (0-255) sets its colour, so classes differ."""
    buffer = io.BytesIO()
    colour = (value, (7 * value) % 256, (255 - value) % 256)
    Image.new("RGB", (8, 8), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _py2_pickle(record: dict) -> bytes:
    # The real archive was written by Python 2's cPickle: protocol 2, byte-string keys.
    return pickle.dumps({k.encode(): v for k, v in record.items()}, protocol=2)


def cifar_archive(train_per_class: int = 2, test_per_class: int = 1) -> bytes:
    """cifar-100-python.tar.gz: cifar-100-python/{train,test,meta}, planar uint8 rows."""
    rng = np.random.default_rng(0)
    members = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        labels = [c for c in range(100) for _ in range(per_class)]
        members[f"cifar-100-python/{split}"] = _py2_pickle(
            {
                "data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8),
                "fine_labels": labels,
                "coarse_labels": [c // 5 for c in labels],
                "filenames": [b"img_%d.png" % i for i in range(len(labels))],
            }
        )
    members["cifar-100-python/meta"] = _py2_pickle(
        {
            "fine_label_names": [n.encode() for n in names_lib.CIFAR100],
            "coarse_label_names": [b"superclass"] * 20,
        }
    )
    return tar_bytes(members)


def imagenet_r_archive(per_class: int = 3) -> bytes:
    """imagenet-r.tar (uncompressed, as published): imagenet-r/<wnid>/art_<j>.jpg, 200 wnids."""
    wnids = names_lib.wnids(names_lib.IMAGENET_R)
    members = {
        f"imagenet-r/{w}/art_{j}.jpg": jpeg(k)
        for k, w in enumerate(wnids)
        for j in range(per_class)
    }
    return tar_bytes(members, mode="w")


def rapf_split(per_class: int = 3) -> bytes:
    """RAPF's format: `train`, the first per_class - 1 images of each class, `test`, the last."""
    wnids = names_lib.wnids(names_lib.IMAGENET_R)
    train = [f"{w}/art_{j}.jpg" for w in wnids for j in range(per_class - 1)]
    test = [f"{w}/art_{per_class - 1}.jpg" for w in wnids]
    return "\n".join(["train", *train, "test", *test, ""]).encode()


def cub_archive(per_class: int = 3) -> bytes:
    """CUB_200_2011.tgz: CUB_200_2011/{images/, images.txt, image_class_labels.txt,
    train_test_split.txt, classes.txt} plus a top-level attributes.txt, as in the real one.
    The last image of each class is a test image."""
    folders = [f"{c + 1:03d}.{name}" for c, name in enumerate(names_lib.CUB200)]
    members, images, labels, split = {}, [], [], []
    for c, folder in enumerate(folders):
        for j in range(per_class):
            image_id = len(images) + 1
            path = f"{folder}/{folder.split('.', 1)[1]}_{j:04d}.jpg"
            members[f"CUB_200_2011/images/{path}"] = jpeg(c)
            images.append(f"{image_id} {path}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {int(j < per_class - 1)}")
    lines = {
        "images.txt": images,
        "image_class_labels.txt": labels,
        "train_test_split.txt": split,
        "classes.txt": [f"{c + 1} {folder}" for c, folder in enumerate(folders)],
    }
    for name, rows in lines.items():
        members[f"CUB_200_2011/{name}"] = ("\n".join(rows) + "\n").encode()
    members["attributes.txt"] = b"1 has_bill_shape::curved\n"
    return tar_bytes(members)
