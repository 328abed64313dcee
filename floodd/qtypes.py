"""DNS query types, named as operators write them (RFC 3597 ``TYPEnnn`` for the rest)."""

from __future__ import annotations

import re

# IANA "Resource Record (RR) TYPEs" registry, the ones seen in practice.
_NAMES: dict[int, str] = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT",
    17: "RP", 18: "AFSDB", 24: "SIG", 25: "KEY", 28: "AAAA", 29: "LOC", 33: "SRV",
    35: "NAPTR", 36: "KX", 37: "CERT", 39: "DNAME", 41: "OPT", 42: "APL", 43: "DS",
    44: "SSHFP", 45: "IPSECKEY", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 49: "DHCID",
    50: "NSEC3", 51: "NSEC3PARAM", 52: "TLSA", 53: "SMIMEA", 55: "HIP", 59: "CDS",
    60: "CDNSKEY", 61: "OPENPGPKEY", 62: "CSYNC", 63: "ZONEMD", 64: "SVCB", 65: "HTTPS",
    99: "SPF", 108: "EUI48", 109: "EUI64", 249: "TKEY", 250: "TSIG", 251: "IXFR",
    252: "AXFR", 253: "MAILB", 254: "MAILA", 255: "ANY", 256: "URI", 257: "CAA",
}
_CODES: dict[str, int] = {name: code for code, name in _NAMES.items()}
_TYPE_RE = re.compile(r"TYPE(\d{1,5})")


def qtype_name(code: int) -> str:
    """``255`` -> ``"ANY"``, ``65399`` -> ``"TYPE65399"``."""
    return _NAMES.get(code, f"TYPE{code}")


def qtype_code(name: str) -> int:
    """``"any"`` -> 255, ``"TYPE65399"`` -> 65399, ``"*"`` -> 255; ValueError otherwise."""
    text = name.strip().upper()
    if text == "*":
        return 255
    if text in _CODES:
        return _CODES[text]
    m = _TYPE_RE.fullmatch(text)
    if m and int(m.group(1)) <= 65535:
        return int(m.group(1))
    raise ValueError(f"unknown query type {name!r}")
