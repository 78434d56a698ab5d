#!/usr/bin/env python3
"""Writes the JITed machine code of a loaded BPF program, one file per function.

Debian's bpftool is built without libbfd, so `bpftool prog dump jited` refuses; this
asks the kernel directly (BPF_PROG_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD) and prints each
function's address and length, to match `perf script` samples (`bpf_prog_<tag>_<name>+off`)
with the code at that offset:

    scripts/bpf-jit-dump.py <prog id> /tmp/state      # /tmp/state.<n>.bin
    objdump -D -b binary -mi386:x86-64 /tmp/state.1.bin

docs/kernel.md ("Finding the hot instruction") has the whole procedure. Run as root.
"""

import ctypes
import os
import struct
import sys

SYS_BPF = 321  # x86_64
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
INFO_SIZE = 256  # room for struct bpf_prog_info's fields used below

libc = ctypes.CDLL(None, use_errno=True)


def bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, len(attr))
    fd = libc.syscall(SYS_BPF, cmd, buf, len(attr))
    if fd < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"bpf({cmd}): {os.strerror(errno)}")
    return fd


def info(fd: int, filled: ctypes.Array) -> None:
    """BPF_OBJ_GET_INFO_BY_FD into `filled` (a struct bpf_prog_info buffer)."""
    attr = struct.pack("<IIQ", fd, INFO_SIZE, ctypes.addressof(filled)) + bytes(48)
    bpf(BPF_OBJ_GET_INFO_BY_FD, attr)


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(f"usage: {sys.argv[0]} <prog id> <output prefix>")
    prog_id, prefix = int(sys.argv[1]), sys.argv[2]
    try:
        fd = bpf(BPF_PROG_GET_FD_BY_ID, struct.pack("<III", prog_id, 0, 0) + bytes(52))
    except OSError as e:
        sys.exit(f"no program {prog_id} to read: {e.strerror} (an id from `bpftool prog show`; run as root)")

    # struct bpf_prog_info offsets: jited_prog_len 16, jited_prog_insns 24,
    # nr_jited_ksyms 104, nr_jited_func_lens 108, jited_ksyms 112, jited_func_lens 120.
    sizes = ctypes.create_string_buffer(INFO_SIZE)
    info(fd, sizes)
    (jited_len,) = struct.unpack_from("<I", sizes, 16)
    nr_ksyms, nr_lens = struct.unpack_from("<II", sizes, 104)
    if jited_len == 0:
        sys.exit("the program is not JITed (or this process may not read it)")

    code = ctypes.create_string_buffer(jited_len)
    ksyms = (ctypes.c_uint64 * max(nr_ksyms, 1))()
    lens = (ctypes.c_uint32 * max(nr_lens, 1))()
    wanted = ctypes.create_string_buffer(INFO_SIZE)
    struct.pack_into("<I", wanted, 16, jited_len)
    struct.pack_into("<Q", wanted, 24, ctypes.addressof(code))
    struct.pack_into("<II", wanted, 104, nr_ksyms, nr_lens)
    struct.pack_into("<QQ", wanted, 112, ctypes.addressof(ksyms), ctypes.addressof(lens))
    info(fd, wanted)

    functions = [(ksyms[i], lens[i]) for i in range(nr_lens)] or [(0, jited_len)]
    offset = 0
    for n, (address, length) in enumerate(functions):
        with open(f"{prefix}.{n}.bin", "wb") as out:
            out.write(code.raw[offset : offset + length])
        print(f"{n} {address:#x} {length}")
        offset += length


if __name__ == "__main__":
    main()
