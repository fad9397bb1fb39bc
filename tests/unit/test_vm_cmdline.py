"""Rewriting a recorded QEMU command line for a restored clone (qsnap.vm.cmdline)."""
import json

import pytest

from qsnap.errors import VmError
from qsnap.vm.cmdline import join_opts, parse, rewrite_for_clone, split_opts

DISK = {"device": "d0", "qdev": "/machine/peripheral/vd0/virtio-backend", "frozen": "/snap/disk.qcow2",
        "format": "qcow2", "cmdline_file": "/vm/base.img"}


def rewrite(args, disks=(DISK,), **kw):
    words, changes = rewrite_for_clone(["qemu-system-x86_64"] + args, list(disks), "/c",
                                       qmp_path="/c/qmp.sock", **kw)
    return words[1:], changes


def opt(words, name):
    return [words[i + 1] for i, w in enumerate(words) if w == name]


def test_qemuopts_round_trip_with_escaped_commas():
    pairs = split_opts("file=/a,,b.img,if=none,id=d0", )
    assert pairs == [("file", "/a,b.img"), ("if", "none"), ("id", "d0")]
    assert join_opts(pairs) == "file=/a,,b.img,if=none,id=d0"
    assert split_opts("socket,id=x,server,nowait", implied="backend")[:3] == [
        ("backend", "socket"), ("id", "x"), ("server", None)]


def test_parse_knows_flags_from_options_with_arguments():
    args = parse(["-S", "-m", "256M", "-nodefaults", "disk.img", "--daemonize"])
    assert [(a.name, a.value) for a in args] == [("S", None), ("m", "256M"), ("nodefaults", None),
                                               (None, "disk.img"), ("daemonize", None)]
    with pytest.raises(VmError, match="-m without its argument"):
        parse(["-m"])


def test_drive_file_becomes_the_frozen_image_in_its_format():
    words, changes = rewrite(["-drive", "file=/vm/base.img,if=none,id=d0,format=raw",
                              "-drive", "file=/iso/cd.iso,media=cdrom"])
    assert opt(words, "-drive") == ["file=/snap/disk.qcow2,if=none,id=d0,format=qcow2",
                                    "file=/iso/cd.iso,media=cdrom"]
    assert any("/vm/base.img -> /snap/disk.qcow2" in c for c in changes)


def test_a_writable_disk_the_snapshot_did_not_freeze_is_refused():
    with pytest.raises(VmError, match="opens -drive file=/vm/other.img writable"):
        rewrite(["-drive", "file=/vm/base.img", "-drive", "file=/vm/other.img"])
    with pytest.raises(VmError, match="opens /vm/other.img writable"):
        rewrite(["-drive", "file=/vm/base.img", "/vm/other.img"])
    words, _ = rewrite(["-drive", "file=/vm/base.img", "-drive", "file=/vm/ro.img,readonly=on",
                        "-cdrom", "/iso/x.iso"])
    assert "file=/vm/ro.img,readonly=on" in words


def test_blockdev_keyval_and_json_forms():
    words, _ = rewrite(["-blockdev", "driver=file,filename=/vm/base.img,node-name=f0",
                        "-blockdev", "driver=raw,file=f0,node-name=d0"])
    assert json.loads(opt(words, "-blockdev")[0]) == {
        "driver": "file", "filename": "/snap/disk.qcow2", "node-name": "f0"}
    nested = json.dumps({"driver": "raw", "node-name": "d0",
                         "file": {"driver": "file", "filename": "/vm/base.img"}})
    words, _ = rewrite(["-blockdev", nested])
    assert json.loads(opt(words, "-blockdev")[0]) == {
        "driver": "qcow2", "node-name": "d0", "file": {"driver": "file", "filename": "/snap/disk.qcow2"}}


def test_blockdev_format_node_over_a_named_protocol_node_reads_the_frozen_format():
    words, _ = rewrite(["-blockdev", "driver=raw,file=f0,node-name=d0",
                        "-blockdev", "driver=file,filename=/vm/base.img,node-name=f0",
                        "-blockdev", "driver=raw,file=f9,node-name=other"])
    assert [json.loads(w) if w.startswith("{") else w for w in opt(words, "-blockdev")] == [
        {"driver": "qcow2", "file": "f0", "node-name": "d0"},
        {"driver": "file", "filename": "/snap/disk.qcow2", "node-name": "f0"},
        "driver=raw,file=f9,node-name=other"]
    with pytest.raises(VmError, match="backing"):
        rewrite(["-blockdev", "driver=file,filename=/vm/base.img,node-name=f0",
                 "-blockdev", "driver=raw,file=f0,node-name=d0,backing=b0"])


def test_unsafe_disk_options_are_refused_by_name():
    with pytest.raises(VmError, match="snapshot=on"):
        rewrite(["-drive", "file=/vm/base.img,snapshot=on"])
    with pytest.raises(VmError, match="backing"):
        rewrite(["-drive", "file=/vm/base.img,backing.file.filename=/x"])


def test_a_disk_missing_from_the_command_line_is_an_error():
    with pytest.raises(VmError, match="does not name disk d0 .*--qmp"):
        rewrite(["-m", "1G"])


def test_per_instance_resources_move_into_the_clone_directory():
    words, changes = rewrite([
        "-drive", "file=/vm/base.img", "-daemonize", "-pidfile", "/run/vm.pid",
        "-chardev", "socket,id=mon0,path=/run/vm.mon,server=on,wait=off",
        "-chardev", "socket,id=s1,host=0.0.0.0,port=4444,server=on,wait=off",
        "-chardev", "file,id=log0,path=/var/log/vm-serial.log",
        "-serial", "file:/var/log/console.log", "-qmp", "unix:/run/vm.qmp,server,nowait",
        "-monitor", "tcp::5555,server,nowait", "-D", "/var/log/qemu-debug.log",
        "-vnc", ":3", "-netdev", "user,id=n0,hostfwd=tcp::2222-:22", "-incoming", "tcp::4444"])
    assert "-daemonize" not in words and "tcp::4444" not in words
    assert opt(words, "-pidfile") == ["/c/vm.pid"]
    assert opt(words, "-chardev") == [
        "socket,id=mon0,path=/c/vm.mon,server=on,wait=off",
        "socket,id=s1,server=on,wait=off,path=/c/s1.sock",
        "file,id=log0,path=/c/vm-serial.log"]
    assert opt(words, "-serial") == ["file:/c/console.log"]
    assert opt(words, "-qmp") == ["unix:/c/vm.qmp,server,nowait", "unix:/c/qmp.sock,server=on,wait=off"]
    assert opt(words, "-monitor") == ["unix:/c/monitor.sock,server,nowait"]
    assert opt(words, "-D") == ["/c/qemu-debug.log"]
    assert opt(words, "-vnc") == ["unix:/c/vnc.sock"]
    assert opt(words, "-netdev") == ["user,id=n0"]
    assert opt(words, "-incoming") == ["defer"] and "-S" in words
    assert len(changes) == 13, changes


def test_clashing_file_names_get_distinct_paths():
    words, _ = rewrite(["-drive", "file=/vm/base.img", "-chardev", "file,id=a,path=/x/out.log",
                        "-chardev", "file,id=b,path=/y/out.log", "-pidfile", "/run/qmp.sock"])
    assert opt(words, "-chardev") == ["file,id=a,path=/c/out.log", "file,id=b,path=/c/2-out.log"]
    assert opt(words, "-pidfile") == ["/c/2-qmp.sock"]  # never the clone's own QMP socket


def test_drop_arg_and_binary():
    words, changes = rewrite_for_clone(["/old/qemu", "-drive", "file=/vm/base.img", "-vnc", ":1",
                                        "-vnc", ":2"], [DISK], "/c", qmp_path="/c/q.sock",
                                       binary="/new/qemu", drop=["-vnc"])
    assert words[0] == "/new/qemu" and "-vnc" not in words
    assert "dropped every -vnc (--drop-arg)" in changes
