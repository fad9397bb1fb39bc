"""Image: a validated, read-only view of a qsnap image.

Image.open() checks the qcow2 container, the qsnap extension and the metadata
region before anything is used; every offset read from the file is bounds
checked. Errors are ImageError / ChecksumError naming the image offset and
the bad value.

Opening an image and reading its page state needs no NumPy (`qsnap load` starts
faster without it): the cluster maps are array.array, their loops are in
qsnap._core (_maps.pxi).  Only `qsnap check`'s verify_all and the NumPy views
kept for the other engines (BlockInfo.bits/crcs/stored_bits, data_clusters)
import it, when called.
"""

import os
import sys
from array import array
from bisect import bisect_left

from qsnap._core import (argsort_u64, be64_nonzero, crc32c, first_repeat, in_sorted, is_zero, l2_scan,
                         page_crcs, region_of, shifted_left, take)
from qsnap.errors import ChecksumError, ImageError, IOFailure
from qsnap.image import layout, qcow2, workingset
from qsnap.image.layout import pages_of
from qsnap.image.qcow2 import (L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK,
                               L2E_STD_RESERVED_MASK, QCOW_MAGIC, QCOW_OFLAG_COMPRESSED,
                               QCOW_OFLAG_ZERO, REFT_OFFSET_MASK, INCOMPAT_FEATURE_NAMES)

ZERO_CLUSTER = QCOW_OFLAG_ZERO  # the L2 value kept for a zero-flagged cluster (no host offset is 1)
VERIFY_READ = 8 << 20   # bytes per read in verify_all (a bound on check's memory)
SCAN_READ = 8 << 20     # bytes per read while the metadata region's checksums are verified
META_HEAD_READ = 64 << 10  # bytes first read for the metadata document


class BlockInfo:
    """A RAM block of the image.  Its stored-page bitmap and page checksums stay in
    the image (1 bit and 4 bytes per target page: a GiB per TiB of guest) and are
    read window by window: bit_bytes() and crc_array().  ``bitmap`` and
    ``checksums`` read them whole, for small images and tests only.  (A plain
    class: the dataclasses module imports inspect, ~15 ms of a load's start.)"""

    FIELDS = ("idstr", "length", "page_size", "offset", "nonzero_pages", "migrated", "page_size_on_wire",
              "gpa")

    def __init__(self, idstr, length, page_size, offset, nonzero_pages, migrated, page_size_on_wire, gpa,
                 img, bitmap_at, checksums_at):
        self.idstr, self.length, self.page_size, self.offset = idstr, length, page_size, offset
        self.nonzero_pages, self.migrated, self.page_size_on_wire = nonzero_pages, migrated, page_size_on_wire
        self.gpa = gpa
        self._img = img
        self._bitmap_at, self._checksums_at = bitmap_at, checksums_at   # virtual offsets of the blobs

    def __repr__(self):
        return f"BlockInfo({', '.join(f'{k}={getattr(self, k)!r}' for k in self.FIELDS)})"

    @property
    def n_pages(self):
        return pages_of(self.length, self._img.target_page_size)

    def bit_bytes(self, first, n):
        """The stored-bit bytes (bytes) of pages first..first+n-1 (``first`` a multiple
        of 8; bits past the block's last page are 0)."""
        if first % 8 or first < 0 or n < 0:
            raise ValueError(f"bitmap window {first}+{n} does not start at a multiple of 8")
        n = max(0, min(n, self.n_pages - first))
        return self._img._read_virtual(self._bitmap_at + first // 8, (n + 7) // 8)

    def crc_array(self, first, n):
        """array('I') of the checksums of pages first..first+n-1 (clipped to the block)."""
        n = max(0, min(n, self.n_pages - first))
        return le_u32(self._img._read_virtual(self._checksums_at + 4 * first, 4 * n))

    # NumPy views of the same, for check, export and postcopy

    def bits(self, first, n):
        """uint8 array of bit_bytes(first, n)."""
        import numpy as np

        return np.frombuffer(self.bit_bytes(first, n), dtype=np.uint8)

    def stored_bits(self, first, n):
        """bool array: which of pages first..first+n-1 are stored (clipped to the block)."""
        import numpy as np

        lead = first % 8
        bits = np.unpackbits(self.bits(first - lead, n + lead), bitorder="little")
        return bits[lead:lead + max(0, min(n, self.n_pages - first))].astype(bool)

    def crcs(self, first, n):
        """'<u4' array of the checksums of pages first..first+n-1 (clipped to the block)."""
        import numpy as np

        n = max(0, min(n, self.n_pages - first))
        return np.frombuffer(self._img._read_virtual(self._checksums_at + 4 * first, 4 * n), dtype="<u4")

    @property
    def bitmap(self):
        return self.bits(0, self.n_pages)

    @property
    def checksums(self):
        return self.crcs(0, self.n_pages)

    def stored(self, page_index):
        return bool((self.bit_bytes(page_index & ~7, 8)[0] >> (page_index & 7)) & 1)


def le_u32(data):
    """array('I') of the little-endian uint32 items of ``data`` (the image's order)."""
    a = array("I")
    a.frombytes(data)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def pread_exact(fd, length, offset, path):
    try:
        data = os.pread(fd, length, offset)
    except OSError as e:
        raise IOFailure(f"{os.strerror(e.errno).lower()} reading {path} at offset 0x{offset:x}") from None
    if len(data) != length:
        raise ImageError(f"image truncated: {len(data)} of {length} bytes at image offset 0x{offset:x}")
    return data


def pread_into(fd, view, offset, path):
    """Fill the writable buffer ``view`` from ``offset`` (no intermediate bytes object)."""
    try:
        got = os.preadv(fd, [view], offset)
    except OSError as e:
        raise IOFailure(f"{os.strerror(e.errno).lower()} reading {path} at offset 0x{offset:x}") from None
    if got != len(view):
        raise ImageError(f"image truncated: {got} of {len(view)} bytes at image offset 0x{offset:x}")


def read_header(fd, path, file_size):
    """Parse and check the qcow2 header and the qsnap extension. Returns (hdr, ext, ext_off)."""
    head = pread_exact(fd, min(file_size, 4096), 0, path) if file_size else b""
    if len(head) < qcow2.HEADER.size:
        raise ImageError(f"not a qsnap image: {path} is too short for a qcow2 header ({file_size} bytes)")
    hdr = qcow2.HEADER.unpack(head)
    if hdr["magic"] != QCOW_MAGIC:
        raise ImageError(f"not a qsnap image: bad qcow2 magic 0x{hdr['magic']:08x} at image offset 0x0")
    if hdr["version"] != 3:
        raise ImageError(f"unsupported qcow2 version {hdr['version']} at image offset 0x4 (qsnap needs 3)")
    cb = hdr["cluster_bits"]
    if not 16 <= cb <= 21:
        raise ImageError(f"cluster_bits {cb} outside 16..21 at image offset 0x14")
    cs = 1 << cb
    if hdr["header_length"] < qcow2.HEADER_LENGTH_V3 or hdr["header_length"] % 8 \
            or hdr["header_length"] > min(cs, len(head)):
        raise ImageError(f"bad header_length {hdr['header_length']} at image offset 0x64")
    inc = hdr["incompatible_features"]
    if inc:
        names = [INCOMPAT_FEATURE_NAMES.get(b, f"unknown bit {b}") for b in range(64) if inc >> b & 1]
        raise ImageError(f"unsupported incompatible features 0x{inc:x} ({', '.join(names)}) "
                         f"at image offset 0x48")
    if hdr["crypt_method"]:
        raise ImageError(f"encrypted image (crypt_method {hdr['crypt_method']}) at image offset 0x20")
    if hdr["nb_snapshots"] or hdr["snapshots_offset"]:
        raise ImageError(f"unexpected internal snapshots ({hdr['nb_snapshots']}) at image offset 0x3c")
    if hdr["refcount_order"] != qcow2.REFCOUNT_ORDER:
        raise ImageError(f"refcount_order {hdr['refcount_order']} at image offset 0x60, expected 4")
    try:
        exts = qcow2.unpack_extensions(head, hdr["header_length"], min(cs, len(head)))
    except ValueError as e:
        raise ImageError(str(e)) from None
    found = [(p, off) for t, p, off in exts if t == layout.QSNAP_EXT_TYPE]
    if not found:
        raise ImageError(f"not a qsnap image: {path} is a qcow2 file without the qsnap header extension")
    if len(found) > 1:
        raise ImageError(f"duplicate qsnap header extension at image offset 0x{found[1][1]:x}")
    payload, ext_off = found[0]
    ext = layout.unpack_qsnap_ext(payload, ext_off + 8)
    hdr["backing_name"] = _backing_name(hdr, ext, exts, head, cs)
    return hdr, ext, ext_off + 8


def _backing_name(hdr, ext, exts, head, cs):
    """The backing file name of the header (str), or None.  Format 2 only; it lies
    in cluster 0 after the extensions, at most 1023 bytes, no NUL, and a
    backing-format extension, if any, says qcow2."""
    off, size = hdr["backing_file_offset"], hdr["backing_file_size"]
    if not off and not size:
        return None
    if ext["format_version"] < 2:
        raise ImageError(f"unexpected backing file at image offset 0x{off:x} (format version "
                         f"{ext['format_version']} has no backing chains)")
    end = exts[-1][2] + 8 + qcow2.align_up(len(exts[-1][1]), 8) + 8 if exts else hdr["header_length"] + 8
    if off < end or size == 0 or size > qcow2.MAX_BACKING_FILE_SIZE or off + size > min(cs, len(head)):
        raise ImageError(f"backing file name of {size} bytes at image offset 0x{off:x} (header field at "
                         f"image offset 0x8) is empty, too long, overlaps the header extensions or lies "
                         f"outside cluster 0")
    raw = bytes(head[off:off + size])
    for t, payload, at in exts:
        if t == qcow2.QCOW2_EXT_MAGIC_BACKING_FORMAT and payload != qcow2.BACKING_FORMAT:
            raise ImageError(f"backing format {payload!r} at image offset 0x{at + 8:x}, expected 'qcow2'")
    if b"\0" in raw:
        raise ImageError(f"backing file name at image offset 0x{off:x} contains a NUL byte")
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise ImageError(f"backing file name at image offset 0x{off:x} is not UTF-8") from None


def peek_header(path):
    """Cheap check: {'qsnap': bool, 'complete': bool, 'format_version', 'error'}; no exception
    for foreign or damaged files (only for files that cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise IOFailure(f"{os.strerror(e.errno).lower()} opening {path}") from None
    try:
        size = os.fstat(fd).st_size
        hdr, ext, _ = read_header(fd, path, size)
        return {"qsnap": True, "complete": bool(ext["flags"] & layout.QSNAP_FLAG_COMPLETE),
                "format_version": ext["format_version"], "virtual_size": hdr["size"],
                "cluster_size": 1 << hdr["cluster_bits"], "file_bytes": size, "error": None}
    except ImageError as e:
        return {"qsnap": False, "complete": False, "format_version": None, "error": str(e)}
    finally:
        os.close(fd)


class Image:
    """A qsnap image opened for reading. Use Image.open(path)."""

    def __init__(self, path, fd):
        self.path = path
        self._fd = fd
        self.parent = None      # the backing image (Image), None for a stand-alone image
        self.chain = [self]     # [self, parent, grandparent, ...]
        self.image_id = None
        self.backing_name = None

    @classmethod
    def open(cls, path):
        """Open the image at ``path`` and its whole backing chain (each file checked
        against the parent record of the image above it: chain.open_parents)."""
        img = cls._open_one(os.fspath(path))
        try:
            from qsnap.image.chain import open_parents
            open_parents(img)
        except BaseException:
            img.close()
            raise
        return img

    @classmethod
    def _open_one(cls, path):
        """Open and check one file of a chain (its parent is not opened)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise IOFailure(f"{os.strerror(e.errno).lower()} opening {path}") from None
        img = cls(path, fd)
        try:
            img._load()
        except BaseException:
            img.close()
            raise
        return img

    @property
    def fd(self):
        """The image file's descriptor (read only; -1 once closed)."""
        return self._fd

    def close(self):
        """Close this image and its parents."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self.parent is not None:
            self.parent.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    # --- validation ------------------------------------------------------------------

    def _load(self):
        fd, path = self._fd, self.path
        self.file_bytes = size = os.fstat(fd).st_size
        hdr, ext, ext_off = read_header(fd, path, size)
        self.header = hdr
        self.ext = ext
        cb = hdr["cluster_bits"]
        self.cluster_bits = cb
        self.cluster_size = cs = 1 << cb
        if not ext["flags"] & layout.QSNAP_FLAG_COMPLETE:
            raise ImageError("incomplete image (the save did not finish)")
        if size % cs:
            raise ImageError(f"file length 0x{size:x} is not a multiple of the cluster size {cs}")
        self.meta_clusters = {0}  # host clusters holding qcow2 metadata
        self._check_tables(hdr)
        self._map_clusters(hdr)
        doc, blobs = self._read_metadata(ext, ext_off)
        self._check_backing(hdr, doc)
        self._load_blocks(doc, blobs)
        self._check_ram_clusters()
        self.header_bytes = blobs.take(doc["stream"]["header"], "stream.header")
        self.pre_ram = blobs.take(doc["stream"]["pre_ram"], "stream.pre_ram")
        self.device_state = blobs.take(doc["device_state"], "device_state")
        self.stream_info = doc["stream"]
        # a damaged working set is reported, never fatal: it only orders pages
        self.working_set, self.working_set_problem = workingset.read(self)

    def _check_backing(self, hdr, doc):
        """The header's backing name and the metadata's parent record agree, and a
        child's metadata region is its own (every cluster allocated or zero-flagged)."""
        name = hdr["backing_name"]
        parent = doc.get("parent") if doc["format_version"] >= 2 else None
        self.backing_name = name
        if parent is None and name is not None:
            raise ImageError(f"{self.path} names backing file {name!r} in its header but its "
                             "metadata records no parent")
        if parent is not None and parent["backing_file"] != name:
            raise ImageError(f"{self.path}: metadata parent.backing_file {parent['backing_file']!r} "
                             f"differs from the header's backing file {name!r}")
        if name is None:
            return
        cb = self.cluster_bits
        # each virtual cluster has one L2 entry: the mapped and zero-flagged sets are
        # disjoint, ascending and each free of repeats, so their sizes add up
        first, last = self.meta_offset >> cb, self.virtual_size >> cb
        n_own = sum(bisect_left(own, last) - bisect_left(own, first)
                    for own in (self._mapped_virt, self._zero_virt))
        if n_own != last - first:
            raise ImageError(f"{self.path}: the metadata region of a child image is not all its own "
                             f"({n_own} of {last - first} clusters from virtual offset 0x{first << cb:x} "
                             "are allocated or zero)")

    def _claim_table(self, what, off, nbytes, at):
        """A metadata table must be cluster aligned, inside the file, and overlap no other."""
        cs, size = self.cluster_size, self.file_bytes
        if off % cs or off == 0 or off + nbytes > size:
            raise ImageError(f"{what} offset 0x{off:x} (at image offset 0x{at:x}) is "
                             f"unaligned or outside the file (0x{size:x} bytes)")
        for c in range(off // cs, (off + max(nbytes, 1) + cs - 1) // cs):
            if c in self.meta_clusters:
                raise ImageError(f"{what} at 0x{off:x} overlaps other metadata "
                                 f"(at image offset 0x{at:x})")
            self.meta_clusters.add(c)

    def _check_tables(self, hdr):
        """Virtual size, L1 table, refcount table and refcount blocks."""
        cs, cb = self.cluster_size, self.cluster_bits
        vsize = hdr["size"]
        if vsize % cs:
            raise ImageError(f"virtual size 0x{vsize:x} at image offset 0x18 is not cluster aligned")
        l1_size = hdr["l1_size"]
        if l1_size < qcow2.l1_size_for(vsize, cb) or l1_size > (1 << 25):
            raise ImageError(f"L1 size {l1_size} at image offset 0x24 does not match virtual size 0x{vsize:x}")
        self._claim_table("L1 table", hdr["l1_table_offset"], l1_size * 8, 0x28)
        rt_off, rt_clusters = hdr["refcount_table_offset"], hdr["refcount_table_clusters"]
        self._claim_table("refcount table", rt_off, rt_clusters * cs, 0x30)
        rt = pread_exact(self._fd, rt_clusters * cs, rt_off, self.path)
        for i, e in zip(*be64_nonzero(rt)):
            self._claim_table("refcount block", e & REFT_OFFSET_MASK, cs, rt_off + 8 * i)
        self.virtual_size = vsize

    def _map_clusters(self, hdr):
        """Read every L2 table: the sparse virtual -> host cluster map."""
        cs = self.cluster_size
        l1_off = hdr["l1_table_offset"]
        l1 = pread_exact(self._fd, hdr["l1_size"] * 8, l1_off, self.path)
        l2_entries = cs // 8
        n_clusters = self.virtual_size // cs
        # Sparse map: only the L2 tables present in the file are kept (each one a distinct
        # host cluster), so memory is bounded by the file size whatever l1_size says.
        l2_tables = {}
        mapped, hosts, zeros = array("Q"), array("Q"), array("Q")
        for i, e in zip(*be64_nonzero(l1)):
            raw, m_virt, m_host, z_virt = self._read_l2(e, l1_off + 8 * i, i * l2_entries)
            if not len(m_virt) and not len(z_virt):
                continue
            over = [a[bisect_left(a, n_clusters)] for a in (m_virt, z_virt) if len(a) and a[-1] >= n_clusters]
            if over:
                raise ImageError(f"cluster mapped past the virtual size at virtual offset 0x{min(over) * cs:x}")
            l2_tables[i] = raw
            mapped += m_virt
            hosts += m_host
            zeros += z_virt
        self._check_mapping(mapped, hosts)
        self._l2_tables = l2_tables
        self._l2_bits = self.cluster_bits - 3
        # array('Q'), ascending (L1 and L2 order):
        self._mapped_virt = mapped      # virtual cluster index of every mapped cluster
        self._mapped_host = hosts       # its host offset
        # virtual clusters with the bare zero flag (format 2): zeros, whatever a parent holds
        self._zero_virt = zeros

    def _read_l2(self, e, at, first):
        """The L2 table of L1 entry ``e`` (read at image offset ``at``), its first entry
        virtual cluster ``first``: (the table's bytes, and array('Q') of the mapped
        virtual clusters, their host offsets and the zero-flagged virtual clusters)."""
        cs, size = self.cluster_size, self.file_bytes
        if e & L1E_RESERVED_MASK:
            raise ImageError(f"L1 entry 0x{e:016x} has reserved bits set at image offset 0x{at:x}")
        l2_off = e & L1E_OFFSET_MASK
        self._claim_table("L2 table", l2_off, cs, at)
        raw = pread_exact(self._fd, cs, l2_off, self.path)
        # format 2 knows one zero-flag entry: exactly QCOW_OFLAG_ZERO (no host offset)
        m_virt, m_host, z_virt, (compressed, bits, outside) = l2_scan(
            raw, QCOW_OFLAG_COMPRESSED, L2E_STD_RESERVED_MASK, QCOW_OFLAG_ZERO, L2E_OFFSET_MASK,
            self.ext["format_version"] >= 2, cs, size, first)

        def entry(k):
            return int.from_bytes(raw[8 * k:8 * k + 8], "big")
        if compressed >= 0:
            raise ImageError(f"compressed L2 entry 0x{entry(compressed):016x} at image offset "
                             f"0x{l2_off + 8 * compressed:x}")
        if bits >= 0:
            raise ImageError(f"L2 entry 0x{entry(bits):016x} has reserved or zero-flag bits "
                             f"at image offset 0x{l2_off + 8 * bits:x}")
        if outside >= 0:
            raise ImageError(f"L2 entry 0x{entry(outside):016x} at image offset "
                             f"0x{l2_off + 8 * outside:x} points outside the file "
                             f"(0x{size:x} bytes) or is unaligned")
        return raw, m_virt, m_host, z_virt

    def _check_mapping(self, mapped, offs):
        """No host cluster mapped twice, none inside qcow2 metadata."""
        cs = self.cluster_size
        order = argsort_u64(offs)
        d = first_repeat(take(offs, order))
        if d >= 0:
            h = offs[order[d]]
            v1, v2 = mapped[order[d - 1]], mapped[order[d]]
            raise ImageError(f"host cluster 0x{h:x} is mapped twice (virtual offsets 0x{v1 * cs:x} "
                             f"and 0x{v2 * cs:x})")
        clash = in_sorted(offs, array("Q", sorted(c * cs for c in self.meta_clusters))).find(1)
        if clash >= 0:
            v = mapped[clash]
            raise ImageError(f"data cluster at image offset 0x{offs[clash]:x} (virtual "
                             f"offset 0x{v * cs:x}) overlaps qcow2 metadata")

    def _read_metadata(self, ext, ext_off):
        """The metadata region, checked in one streaming pass (its crc32c, every
        blob's, the bitmaps' population counts) without holding it whole:
        (document, _Blobs)."""
        cs, size, vsize = self.cluster_size, self.file_bytes, self.virtual_size
        mo, ml = ext["meta_offset"], ext["meta_length"]
        if mo % cs or ml < layout.META_HEAD.size or mo + ml > vsize:
            raise ImageError(f"metadata region 0x{mo:x}+0x{ml:x} (header extension at image offset "
                             f"0x{ext_off:x}) lies outside the virtual size 0x{vsize:x}")
        if ml > size:  # stored in the file: never allocate more than the file holds
            raise ImageError(f"metadata length 0x{ml:x} at image offset 0x{ext_off + 16:x} exceeds "
                             f"the file size 0x{size:x}")
        self.meta_offset = mo
        self.meta_length = ml
        head = b""
        try:
            head = self._meta_head(mo, ml)
            doc, regions_end = layout.parse_meta_region(head, ml, mo)
        except ImageError:
            self._scan_region(mo, ml, ext["meta_crc32c"], None, head)   # a damaged region says so first
            raise
        blobs = self._scan_region(mo, ml, ext["meta_crc32c"], doc, head)
        if doc["cluster_size"] != cs:
            raise ImageError(f"metadata cluster_size {doc['cluster_size']} differs from the header's {cs}")
        if doc["format_version"] != ext["format_version"]:
            raise ImageError(f"metadata format_version {doc['format_version']} differs from the header "
                             f"extension's {ext['format_version']}")
        if doc["target_page_size"] != ext["target_page_size"]:
            raise ImageError(f"metadata target_page_size {doc['target_page_size']} differs from the "
                             f"header extension's {ext['target_page_size']}")
        if regions_end > mo:
            raise ImageError(f"RAM block regions end at 0x{regions_end:x}, past the metadata region "
                             f"at 0x{mo:x}")
        self.meta = doc
        self.image_id = doc.get("image_id") if doc["format_version"] >= 2 else None
        self.target_page_size = doc["target_page_size"]
        return doc, blobs

    def _meta_head(self, mo, ml):
        """The metadata region's head and JSON document (all of it, however long).
        A first read of META_HEAD_READ bytes holds a usual document whole; the
        region's blobs after it are read once, by _scan_region, which takes the head
        from here rather than read it again."""
        head = self._read_virtual(mo, min(ml, META_HEAD_READ))
        if len(head) >= layout.META_HEAD.size:
            want = layout.META_HEAD.size + layout.META_HEAD.unpack(head)["json_length"]
            if len(head) < want <= ml:
                head = self._read_virtual(mo, want)
        return head

    def _scan_region(self, mo, ml, want_crc, doc, head=b""):
        """Read the region once (after ``head``, its first bytes, read already): check
        its crc32c, compute each blob's crc32c and each bitmap's population count,
        keep the small blobs' bytes."""
        blobs = _Blobs(doc, doc["target_page_size"] if doc is not None else 0)
        crc = crc32c(head)
        blobs.feed(0, head)
        for pos in range(len(head), ml, SCAN_READ):
            buf = self._read_virtual(mo + pos, min(SCAN_READ, ml - pos))
            crc = crc32c(buf, crc)
            blobs.feed(pos, buf)
        if crc != want_crc:
            raise ChecksumError(f"metadata region checksum mismatch: stored 0x{want_crc:08x}, "
                                f"computed 0x{crc:08x} (metadata at virtual offset 0x{mo:x}, "
                                f"image offset 0x{self.host_offset(mo):x})")
        return blobs

    def _load_blocks(self, doc, blobs):
        mo = self.meta_offset
        blocks = []
        for i, b in enumerate(doc["ram_blocks"]):
            blobs.check(b["bitmap"], f"ram_blocks[{i}].bitmap")
            blobs.check(b["checksums"], f"ram_blocks[{i}].checksums")
            nz = blobs.popcount(b["bitmap"])
            if nz != b["nonzero_pages"]:
                raise ImageError(f"block '{b['idstr']}': nonzero_pages {b['nonzero_pages']} but the "
                                 f"bitmap has {nz} pages")
            blocks.append(BlockInfo(b["idstr"], b["length"], b["page_size"], b["offset"],
                                    b["nonzero_pages"], b["migrated"], b["page_size_on_wire"],
                                    b["gpa"], self, mo + b["bitmap"]["offset"],
                                    mo + b["checksums"]["offset"]))
        self.blocks = blocks

    def blob_chunks(self, ref):
        """The bytes of a blob of the metadata region, SCAN_READ at a time (its
        crc32c was checked when the image was opened)."""
        start = self.meta_offset + ref["offset"]
        for pos in range(0, ref["length"], SCAN_READ):
            yield self._read_virtual(start + pos, min(SCAN_READ, ref["length"] - pos))

    def _check_ram_clusters(self):
        """Every data cluster below the metadata region belongs to a block's region."""
        cb, cs, blocks = self.cluster_bits, self.cluster_size, self.blocks
        starts = array("Q", [b.offset >> cb for b in blocks])
        ends = array("Q", [(b.offset + b.length + cs - 1) >> cb for b in blocks])
        n_ram = self.meta_offset >> cb
        ram = array("Q")
        for own in (self._mapped_virt, self._zero_virt):     # each ascending
            ram += own[:bisect_left(own, n_ram)]
        outside = region_of(ram, starts, ends)[0].find(0)
        if outside >= 0:
            v = ram[outside]
            raise ImageError(f"data or zero cluster (L2 entry 0x{self._cluster_host(v):x}) maps virtual "
                             f"offset 0x{v << cb:x}, outside every RAM block")

    # --- access ------------------------------------------------------------------

    def host_offset(self, voff):
        """Host offset in this file of the byte at virtual offset ``voff`` (0 = not in
        this file: unallocated or zero-flagged; see locate() for the chain)."""
        if not 0 <= voff < self.virtual_size:
            raise ImageError(f"virtual offset 0x{voff:x} outside the image (0x{self.virtual_size:x})")
        h = self._cluster_host(voff >> self.cluster_bits)
        return h + (voff & (self.cluster_size - 1)) if h > ZERO_CLUSTER else 0

    def _cluster_host(self, vc):
        """L2 value of virtual cluster ``vc``: 0 unallocated, ZERO_CLUSTER, else its host offset
        (from the L2 table's bytes, checked by _read_l2)."""
        t = self._l2_tables.get(vc >> self._l2_bits)
        if t is None:
            return 0
        at = 8 * (vc & ((1 << self._l2_bits) - 1))
        e = int.from_bytes(t[at:at + 8], "big")
        return ZERO_CLUSTER if e == QCOW_OFLAG_ZERO else e & L2E_OFFSET_MASK

    def locate(self, voff):
        """(image of the chain, host offset) holding the byte at virtual offset ``voff``,
        or (None, 0) where it reads as zeros: the first file of the chain that
        allocates or zero-flags its cluster decides (QEMU's backing-chain read)."""
        if not 0 <= voff < self.virtual_size:
            raise ImageError(f"virtual offset 0x{voff:x} outside the image (0x{self.virtual_size:x})")
        vc = voff >> self.cluster_bits
        for img in self.chain:
            h = img._cluster_host(vc)
            if h == ZERO_CLUSTER:
                return None, 0
            if h:
                return img, h + (voff & (self.cluster_size - 1))
        return None, 0

    def _read_virtual(self, voff, length):
        """``length`` bytes of the virtual disk at ``voff``, read through the chain:
        one pread where they lie in one run of host clusters of one file (the
        metadata region, page-state windows), else cluster by cluster."""
        img, h = self.locate(voff) if length else (None, 0)
        if img is not None and self._contiguous(img, voff, h, length):
            return pread_exact(img._fd, length, h, img.path)
        out = bytearray(length)
        view = memoryview(out)
        cs = self.cluster_size
        pos = 0
        while pos < length:
            v = voff + pos
            n = min(length - pos, cs - (v & (cs - 1)))
            img, h = self.locate(v)
            if img is not None:
                pread_into(img._fd, view[pos:pos + n], h, img.path)
            pos += n
        view.release()
        return bytes(out)

    def ram_clusters(self):
        """(host, virt): array('Q') of the RAM data clusters' host offsets and virtual
        offsets (bytes), by host offset."""
        cb = self.cluster_bits
        k = bisect_left(self._mapped_virt, self.meta_offset >> cb)
        host = array("Q", self._mapped_host[:k])
        virt = shifted_left(self._mapped_virt[:k], cb)
        order = argsort_u64(host)
        return take(host, order), take(virt, order)

    def _contiguous(self, img, voff, h, length):
        """The clusters of [voff, voff + length) lie in ``img`` one after the other from
        host offset ``h`` (of voff)."""
        cs = self.cluster_size
        v = voff - (voff & (cs - 1)) + cs
        while v < voff + length:
            if self.locate(v) != (img, h + (v - voff)):
                return False
            v += cs
        return True

    def data_clusters(self):
        """(host_offset, virtual_offset) uint64 pairs of the RAM data clusters, by host
        offset: ram_clusters() as an N x 2 NumPy array."""
        import numpy as np

        host, virt = self.ram_clusters()
        pairs = np.empty((len(host), 2), dtype=np.uint64)
        pairs[:, 0] = np.frombuffer(host, np.uint64)
        pairs[:, 1] = np.frombuffer(virt, np.uint64)
        return pairs

    def block_index(self, idstr):
        for i, b in enumerate(self.blocks):
            if b.idstr == idstr:
                return i
        raise ImageError(f"no RAM block '{idstr}' in {self.path}")

    def read_page(self, block_index, offset):
        """The target page at ``offset`` of a block, checked against its crc32c."""
        b = self.blocks[block_index]
        tps = self.target_page_size
        if offset % tps or not 0 <= offset < b.length:
            raise ImageError(f"page offset 0x{offset:x} outside block '{b.idstr}' (length 0x{b.length:x})")
        p = offset // tps
        if not b.stored(p):
            return bytes(tps)
        voff = b.offset + offset
        img, h = self.locate(voff)
        if img is None:
            raise ImageError(f"stored page 0x{offset:x} of block '{b.idstr}' has no data cluster "
                             f"(virtual offset 0x{voff:x})")
        data = pread_exact(img._fd, tps, h, img.path)
        crc = crc32c(data)
        if crc != int(b.crcs(p, 1)[0]):
            where = "" if img is self else f" of {img.path}"
            raise ChecksumError(f"checksum mismatch in block '{b.idstr}' page 0x{offset:x} "
                                f"(image offset 0x{h:x}{where})")
        return data

    def verify_all(self, progress=None):
        """Check every stored page of this image against its crc, wherever in the chain
        its cluster lies (each file's data clusters read in host order), that unstored
        pages read as zeros and that every stored page lies in a data cluster.

        Returns a list of problem strings (empty when the image is intact)."""
        import numpy as np

        from qsnap.image.chain import cluster_sources

        virt, src, host = (np.frombuffer(a, a.typecode) for a in cluster_sources(self))
        cb = self.cluster_bits
        # virtual cluster -> block: regions are sorted and disjoint (validate_meta)
        self._starts = np.array([b.offset >> cb for b in self.blocks], dtype=np.uint64)
        self._ends = np.array([(b.offset + b.length + self.cluster_size - 1) >> cb for b in self.blocks],
                              dtype=np.uint64)
        problems = []
        covered = [0] * len(self.blocks)
        total, done = len(virt), 0
        for k, img in enumerate(self.chain):
            rows = np.flatnonzero(src == k)
            pairs = np.empty((len(rows), 2), dtype=np.uint64)
            pairs[:, 0] = host[rows]
            pairs[:, 1] = virt[rows] << np.uint64(cb)
            for n in self._verify_file(img, pairs, problems, covered):
                done += n
                if progress is not None:
                    progress(done, total)
        for b, n in zip(self.blocks, covered):
            if n != b.nonzero_pages:
                problems.append(f"block '{b.idstr}': {b.nonzero_pages - n} stored pages lie in no data "
                                f"cluster of the image{' chain' if self.parent is not None else ''}")
        return problems

    def _owner(self, vc):
        import numpy as np

        k = int(np.searchsorted(self._starts, np.uint64(vc), side="right")) - 1
        return k if k >= 0 and vc < int(self._ends[k]) else None

    def _verify_file(self, img, pairs, problems, covered):
        """Verify the clusters ``pairs`` ((host offset in ``img``, virtual offset), by host
        offset) against this image's bitmaps and checksums; yields clusters done."""
        import numpy as np

        cs, tps, cb = self.cluster_size, self.target_page_size, self.cluster_bits
        ppc = cs // tps
        where = "" if img is self else f" of {img.path}"
        total = len(pairs)
        i = 0
        while i < total:
            j = i + 1
            while (j < total and (j - i) * cs < VERIFY_READ
                   and int(pairs[j, 0]) == int(pairs[j - 1, 0]) + cs):
                j += 1
            buf = pread_exact(img._fd, (j - i) * cs, int(pairs[i, 0]), img.path)
            crcs = page_crcs(buf, tps)
            for k in range(i, j):
                h = int(pairs[k, 0])
                bi = self._owner(int(pairs[k, 1]) >> cb)
                if bi is None:
                    problems.append(f"data cluster at image offset 0x{h:x}{where} maps virtual "
                                    f"offset 0x{int(pairs[k, 1]):x}, outside every block")
                    continue
                b = self.blocks[bi]
                first = (int(pairs[k, 1]) - b.offset) // tps
                n = min(ppc, pages_of(b.length, tps) - first)
                bits = b.stored_bits(first, n)
                covered[bi] += int(np.count_nonzero(bits))
                got = crcs[(k - i) * ppc:(k - i) * ppc + n]
                bad = np.flatnonzero(bits & (got != b.crcs(first, n)))
                for p in bad:
                    po = (first + int(p)) * tps
                    problems.append(f"checksum mismatch in block '{b.idstr}' page 0x{po:x} "
                                    f"(image offset 0x{h + int(p) * tps:x}{where})")
                if n < ppc:  # the cluster's end past the block: written as zeros
                    lo = (k - i) * cs + n * tps
                    if not is_zero(memoryview(buf)[lo:(k - i + 1) * cs]):
                        problems.append(f"non-zero bytes past the end of block '{b.idstr}' in the data "
                                        f"cluster at image offset 0x{h:x}{where}")
                for p in np.flatnonzero(~bits):
                    lo = (k - i) * cs + int(p) * tps
                    if not is_zero(memoryview(buf)[lo:lo + tps]):
                        po = (first + int(p)) * tps
                        problems.append(f"page 0x{po:x} of block '{b.idstr}' is not marked stored "
                                        f"but is not zero (image offset 0x{h + int(p) * tps:x}{where})")
            yield j - i
            i = j

    def info(self):
        """A summary for `qsnap info` (JSON-serialisable)."""
        from qsnap.image.chain import chain_info

        m = self.meta
        return {
            "path": self.path,
            "format_version": self.ext["format_version"],
            "complete": bool(self.ext["flags"] & layout.QSNAP_FLAG_COMPLETE),
            "page_size": self.target_page_size,
            "cluster_size": self.cluster_size,
            "machine": m["machine"],
            "qsnap_version": m["qsnap_version"],
            "created": m["created"],
            "checksum": m["checksum"],
            "device_state_bytes": len(self.device_state),
            "file_bytes": self.file_bytes,
            "virtual_size": self.virtual_size,
            "ram_blocks": [{"idstr": b.idstr, "length": b.length, "page_size": b.page_size,
                            "offset": b.offset, "nonzero_pages": b.nonzero_pages,
                            "migrated": b.migrated} for b in self.blocks],
            "counts": dict(m["counts"]),
            "vm": m.get("vm"),
            "working_set": self.working_set.info() if self.working_set is not None else None,
            "working_set_problem": self.working_set_problem,
            "image_id": self.image_id,
            "backing_file": self.backing_name,
            "chain": chain_info(self),
        }


class _BlobScan:
    """One blob's running crc32c, and for a bitmap its population count over
    ``n_pages`` bits, or for a small blob its bytes."""

    def __init__(self, ref, n_pages=None, keep=False):
        self.ref, self.n_pages = ref, n_pages
        self.crc, self.popcount = 0, 0
        self.data = bytearray() if keep else None

    def feed(self, piece, last):
        self.crc = crc32c(piece, self.crc)
        if self.data is not None:
            self.data += piece
        if self.n_pages is not None:
            if last and self.n_pages % 8:   # bits past the block's last page do not count
                tail = piece[-1] & ((1 << (self.n_pages % 8)) - 1)
                piece = piece[:-1]
                self.popcount += tail.bit_count()
            self.popcount += int.from_bytes(piece, "little").bit_count()


class _Blobs:
    """What one pass over the metadata region learns about its blobs (_BlobScan each)."""

    def __init__(self, doc, target_page_size):
        self.scans = {}
        if doc is None:
            return
        for ref in (doc["stream"]["header"], doc["stream"]["pre_ram"], doc["device_state"]):
            self._add(ref, keep=True)
        for b in doc["ram_blocks"]:
            self._add(b["bitmap"], n_pages=pages_of(b["length"], target_page_size))
            self._add(b["checksums"])

    def _add(self, ref, **kw):
        key = (ref["offset"], ref["length"])
        if key not in self.scans:
            self.scans[key] = _BlobScan(ref, **kw)
        elif kw.get("keep"):
            self.scans[key].data = self.scans[key].data or bytearray()

    def feed(self, pos, buf):
        end = pos + len(buf)
        view = memoryview(buf)
        for (off, length), scan in self.scans.items():
            lo, hi = max(off, pos), min(off + length, end)
            if lo < hi:
                scan.feed(view[lo - pos:hi - pos], hi == off + length)

    def _scan(self, ref):
        return self.scans[(ref["offset"], ref["length"])]

    def check(self, ref, what):
        layout.check_crc(self._scan(ref).crc, ref, what)

    def popcount(self, ref):
        return self._scan(ref).popcount

    def take(self, ref, what):
        self.check(ref, what)
        return bytes(self._scan(ref).data)
