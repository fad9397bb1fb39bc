"""An image's metadata document, read without the page machinery.

`qsnap restore` needs only what an image says about its VM (the VM record, the
machine type, the RAM blocks' names and lengths) before it starts QEMU.  The image
reader (qsnap.image.reader) maps every cluster and loads every block's bitmap and
checksums, which takes NumPy and the C extension and reads the whole metadata
region; the restore's `qsnap load` child does exactly that again a moment later.
This module reads only the qcow2 header, the qsnap header extension, the L1 and L2
entries that map the metadata region's head, and the JSON document, checked as the
reader checks them (bounds, reserved bits, layout.validate_meta).

It does not check the crc32c of the extension or of the metadata region (that needs
the C extension and the whole region, blobs included): the `qsnap load` a restore
starts opens the image with the full reader and refuses damaged metadata before it
writes a byte of the stream, and the restore then fails and cleans up as for any
load failure.

``readahead(path)`` asks the kernel to bring into the page cache what that reader
reads (the qcow2 tables and the whole metadata region), so that a restore can have
it read while the QEMU it launched starts, instead of after.
"""
import errno
import os

from qsnap.errors import ImageError, IOFailure
from qsnap.image import layout, qcow2

HEAD_READ = 4096  # the header cluster's first bytes: the header and its extensions


def read_metadata(path):
    """The metadata document (docs/image-format.md section 3) of the image at ``path``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise IOFailure(f"{os.strerror(e.errno).lower()} opening {path}") from None
    try:
        doc = _Reader(fd, path).document()
        seen = {_file_key(fd)}
    finally:
        os.close(fd)
    _check_parents(path, doc, seen)
    return doc


def _file_key(fd):
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def _check_parents(path, doc, seen):
    """Every parent of a format 2 child exists, is a complete qsnap image and is the
    snapshot the child records (image_id when recorded, created): what a restore
    checks before it starts QEMU.  The full reader checks the rest when it loads."""
    child = path
    while doc.get("format_version", 1) >= 2 and doc.get("parent") is not None:
        if len(seen) > layout.MAX_CHAIN_DEPTH:
            raise ImageError(f"backing chain of {path} is deeper than {layout.MAX_CHAIN_DEPTH} images")
        rec = doc["parent"]
        parent = layout.resolve_backing(rec["backing_file"], child)
        try:
            fd = os.open(parent, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            what = "is missing" if e.errno == errno.ENOENT else f"cannot be opened ({os.strerror(e.errno)})"
            raise ImageError(f"parent image {parent} of {child} {what}") from None
        try:
            if _file_key(fd) in seen:
                raise ImageError(f"backing chain of {path} loops: parent image {parent} of {child} "
                                 "is already in the chain")
            seen.add(_file_key(fd))
            try:
                pdoc = _Reader(fd, parent).document()
            except ImageError as e:
                raise ImageError(f"parent image {parent} of {child} cannot be used: {e}") from None
        finally:
            os.close(fd)
        for what, recorded, found in (("image_id", rec["image_id"], pdoc.get("image_id")),
                                      ("created", rec["created"], pdoc["created"])):
            if recorded is not None and recorded != found:
                raise ImageError(f"parent image {parent} of {child} does not match: {what} {recorded} "
                                 f"recorded, {found if found is not None else 'none'} found")
        child, doc = parent, pdoc


def readahead(path):
    """Start reading into the page cache the parts of the image the full reader reads
    when it opens it: the L1 table, every L2 table, the refcount table and the metadata
    region's clusters (posix_fadvise WILLNEED: the kernel reads them in the background).
    Returns the bytes asked for; a damaged image is left to the reader to report.
    The same for every parent of a backing chain (the reader opens them all)."""
    total = 0
    for _ in range(layout.MAX_CHAIN_DEPTH + 1):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return total
        try:
            r = _Reader(fd, path)
            total += r.readahead()
            parent = r.document().get("parent")
        except (ImageError, IOFailure, OSError):  # OSError: a filesystem without fadvise
            return total
        finally:
            os.close(fd)
        if not isinstance(parent, dict):
            return total
        path = layout.resolve_backing(parent["backing_file"], path)
    return total


class _Reader:
    def __init__(self, fd, path):
        self.fd, self.path = fd, path
        self.file_bytes = os.fstat(fd).st_size

    def document(self):
        ext = self._start()
        mo, ml = self._meta_region(ext)
        n = layout.meta_json_length(self._read_virtual(mo, layout.META_HEAD.size), ml, mo)
        doc, _ = layout.parse_meta_json(self._read_virtual(mo + layout.META_HEAD.size, n), ml, mo)
        return doc

    def readahead(self):
        ext = self._start()
        hdr, cs = self.hdr, self.cluster_size
        self._check_table(hdr["l1_table_offset"], 0x28, "L1 table")
        l1 = self._pread(8 * hdr["l1_size"], hdr["l1_table_offset"], exact=True)
        ranges = [(hdr["refcount_table_offset"], hdr["refcount_table_clusters"] * cs)]
        for i in range(hdr["l1_size"]):
            l2 = int.from_bytes(l1[8 * i:8 * i + 8], "big") & qcow2.L1E_OFFSET_MASK
            if l2:
                ranges.append((l2, cs))
        total = self._advise(ranges)  # the tables first: mapping the metadata reads its L2 entries
        mo, ml = self._meta_region(ext)
        hosts = [self._host_cluster(v) for v in range(mo, mo + ml, cs)]
        return total + self._advise([(h, cs) for h in hosts if h])

    def _meta_region(self, ext):
        """(offset, length) of the metadata region: cluster aligned, inside the virtual disk
        and no longer than the file (it is stored there)."""
        mo, ml, vsize = ext["meta_offset"], ext["meta_length"], self.hdr["size"]
        if mo % self.cluster_size or ml < layout.META_HEAD.size or mo + ml > vsize or ml > self.file_bytes:
            raise ImageError(f"metadata region 0x{mo:x}+0x{ml:x} lies outside the virtual size "
                             f"0x{vsize:x} or the file (0x{self.file_bytes:x} bytes) of {self.path}")
        return mo, ml

    def _advise(self, ranges):
        total = 0
        for off, length in ranges:
            if 0 < off < self.file_bytes and length > 0:
                os.posix_fadvise(self.fd, off, min(length, self.file_bytes - off), os.POSIX_FADV_WILLNEED)
                total += min(length, self.file_bytes - off)
        return total

    # --- header -----------------------------------------------------------------------

    def _start(self):
        """Read the header: keeps it and the cluster size, returns the qsnap extension."""
        self.hdr, ext = self._header()
        self.ext = ext
        self.cluster_bits = self.hdr["cluster_bits"]
        self.cluster_size = 1 << self.cluster_bits
        return ext

    def _header(self):
        """(qcow2 header, qsnap extension) of a complete qsnap image, or ImageError."""
        head = self._pread(min(self.file_bytes, HEAD_READ), 0)
        if len(head) < qcow2.HEADER.size:
            raise ImageError(f"not a qsnap image: {self.path} is too short for a qcow2 header "
                             f"({self.file_bytes} bytes)")
        hdr = qcow2.HEADER.unpack(head)
        if hdr["magic"] != qcow2.QCOW_MAGIC:
            raise ImageError(f"not a qsnap image: bad qcow2 magic 0x{hdr['magic']:08x} at image offset 0x0")
        if hdr["version"] != qcow2.QCOW_VERSION:
            raise ImageError(f"unsupported qcow2 version {hdr['version']} at image offset 0x4 (qsnap needs 3)")
        if not 16 <= hdr["cluster_bits"] <= qcow2.MAX_CLUSTER_BITS:
            raise ImageError(f"cluster_bits {hdr['cluster_bits']} outside 16..21 at image offset 0x14")
        if hdr["incompatible_features"]:
            raise ImageError(f"unsupported incompatible features 0x{hdr['incompatible_features']:x} "
                             "at image offset 0x48")
        length = hdr["header_length"]
        if length < qcow2.HEADER_LENGTH_V3 or length % 8 or length > len(head):
            raise ImageError(f"bad header_length {length} at image offset 0x64")
        try:
            exts = qcow2.unpack_extensions(head, length, len(head))
        except ValueError as e:
            raise ImageError(str(e)) from None
        found = [(p, off) for t, p, off in exts if t == layout.QSNAP_EXT_TYPE]
        if len(found) != 1:
            raise ImageError(f"not a qsnap image: {self.path} is a qcow2 file without the qsnap header extension"
                             if not found else f"duplicate qsnap header extension at image offset 0x{found[1][1]:x}")
        ext = layout.read_qsnap_ext(found[0][0], found[0][1] + 8)
        if not ext["flags"] & layout.QSNAP_FLAG_COMPLETE:
            raise ImageError(f"incomplete image {self.path} (the save did not finish)")
        return hdr, ext

    # --- clusters ---------------------------------------------------------------------

    def _read_virtual(self, voff, length):
        """``length`` bytes of the virtual disk at ``voff`` (unallocated clusters read as zeros)."""
        out, cs, pos = bytearray(length), self.cluster_size, 0
        while pos < length:
            v = voff + pos
            n = min(length - pos, cs - (v & (cs - 1)))
            host = self._host_cluster(v)
            if host:
                out[pos:pos + n] = self._pread(n, host + (v & (cs - 1)), exact=True)
            pos += n
        return bytes(out)

    def _host_cluster(self, voff):
        """Host offset of the cluster holding virtual offset ``voff`` (0: unallocated), through
        one L1 and one L2 entry (QEMU's block/qcow2-cluster.c qcow2_get_host_offset)."""
        cb, hdr = self.cluster_bits, self.hdr
        i = qcow2.offset_to_l1_index(voff, cb)
        if i >= hdr["l1_size"]:
            raise ImageError(f"virtual offset 0x{voff:x} is past the L1 table ({hdr['l1_size']} entries)")
        self._check_table(hdr["l1_table_offset"], 0x28, "L1 table")
        at = hdr["l1_table_offset"] + 8 * i
        l1e = self._entry(at)
        if l1e & qcow2.L1E_RESERVED_MASK:
            raise ImageError(f"L1 entry 0x{l1e:016x} has reserved bits set at image offset 0x{at:x}")
        l2 = l1e & qcow2.L1E_OFFSET_MASK
        if not l2:
            return 0
        self._check_table(l2, at, "L2 table")
        at = l2 + 8 * qcow2.offset_to_l2_index(voff, cb)
        l2e = self._entry(at)
        if l2e == qcow2.QCOW_OFLAG_ZERO and self.ext["format_version"] >= 2:
            return 0    # reads as zeros
        if l2e & (qcow2.QCOW_OFLAG_COMPRESSED | qcow2.L2E_STD_RESERVED_MASK | qcow2.QCOW_OFLAG_ZERO):
            raise ImageError(f"L2 entry 0x{l2e:016x} is compressed or has reserved or zero-flag bits "
                             f"at image offset 0x{at:x}")
        host = l2e & qcow2.L2E_OFFSET_MASK
        if host:
            self._check_table(host, at, "data cluster")
        return host

    def _check_table(self, off, at, what):
        cs = self.cluster_size
        if off % cs or off == 0 or off + cs > self.file_bytes:
            raise ImageError(f"{what} offset 0x{off:x} (at image offset 0x{at:x}) is unaligned or "
                             f"outside the file (0x{self.file_bytes:x} bytes)")

    def _entry(self, at):
        return int.from_bytes(self._pread(8, at, exact=True), "big")

    def _pread(self, length, offset, exact=False):
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as e:
            raise IOFailure(f"{os.strerror(e.errno).lower()} reading {self.path} at offset 0x{offset:x}") from None
        if exact and len(data) != length:
            raise ImageError(f"image truncated: {len(data)} of {length} bytes at image offset 0x{offset:x}")
        return data
