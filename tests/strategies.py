"""Hypothesis strategies for poison input: every way a Kafka value can be wrong or odd."""

import orjson
from hypothesis import strategies as st

JSON_TEXTS = st.text(alphabet=st.characters(codec="utf-8", categories=["L", "M", "N", "P", "S", "Zs", "Cc"]),
                     min_size=1, max_size=200)
SPECIAL = st.sampled_from(["nul\u0000byte", "مرحبا بالعالم، كيف حالك", "שלום עולם", "e\u0301\u0302\u0303 o\u0308",
                           "🔥🔥 lol 😂👩‍👩‍👧‍👦", "\u200f\u202eRTL override", "  leading spaces ok"])
POISON = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=100).map(lambda b: b"\xff\xfe" + b),  # invalid UTF-8
    st.text(max_size=100).map(lambda s: s.encode("utf-8", "surrogatepass")),
    st.fixed_dictionaries({"text": st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.just(""), st.text(alphabet=" \t\n\r"),
                                             st.lists(st.integers(-2**63, 2**63 - 1), max_size=3), st.booleans())}).map(orjson.dumps),
    st.fixed_dictionaries({"id": st.text(max_size=10)}).map(orjson.dumps),
    st.integers(min_value=100, max_value=4000).map(lambda d: b'{"text": "x", "junk": ' + b"[" * d + b"]" * d + b"}"),
    st.one_of(JSON_TEXTS, SPECIAL).map(lambda s: orjson.dumps({"text": s})),
)
