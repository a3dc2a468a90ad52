# Streams a deterministic body of QUERY_STRING bytes=N (seed=S, default 1) in 64 KiB chunks.
# cl=0 leaves out Content-Length (so Apache sends it chunked).
#
# The pattern, implemented identically in tests/common/mod.rs (Pattern):
#   base  = 65536 bytes: 8192 xorshift64 outputs (x ^= x<<13; x ^= x>>7; x ^= x<<17, 64-bit),
#           each as 8 little-endian bytes, starting from x = (seed * 0x9E3779B97F4A7C15 mod 2^64) | 1
#   chunk i (0-based, 65536 bytes) = base rotated left by r = (i * 7919) % 65536,
#           i.e. chunk[o] = base[(o + r) % 65536]
#   stream = chunk 0, chunk 1, ... truncated to N bytes.
from urllib.parse import parse_qs

BLOCK = 65536
MASK = (1 << 64) - 1
_bases = {}


def base_block(seed):
    base = _bases.get(seed)
    if base is None:
        x = ((seed * 0x9E3779B97F4A7C15) & MASK) | 1
        out = []
        for _ in range(BLOCK // 8):
            x ^= (x << 13) & MASK
            x ^= x >> 7
            x ^= (x << 17) & MASK
            out.append(x.to_bytes(8, "little"))
        base = b"".join(out)
        _bases[seed] = base
    return base


def pattern_chunks(seed, total):
    base = base_block(seed)
    i = 0
    sent = 0
    while sent < total:
        r = (i * 7919) % BLOCK
        chunk = base[r:] + base[:r]
        n = min(BLOCK, total - sent)
        yield chunk[:n]
        sent += n
        i += 1


def application(environ, start_response):
    qs = parse_qs(environ.get("QUERY_STRING", ""))
    total = int(qs.get("bytes", ["1048576"])[0])
    seed = int(qs.get("seed", ["1"])[0])
    headers = [("Content-Type", "application/octet-stream")]
    if qs.get("cl", ["1"])[0] != "0":
        headers.append(("Content-Length", str(total)))
    start_response("200 OK", headers)
    return pattern_chunks(seed, total)
