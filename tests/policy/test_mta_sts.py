"""MTA-STS TXT records, policy text and MX patterns (RFC 8461 §3.1, §3.2, §4.1)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mta.policy.mta_sts import (
    MAX_MAX_AGE,
    MAX_POLICY_BYTES,
    StsError,
    StsMode,
    StsPolicy,
    StsPolicyError,
    StsRecordError,
    mx_matches,
    parse_policy,
    parse_txt,
)

# --- §3.1 TXT records --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("records", "policy_id"),
    [
        (["v=STSv1; id=20160831085700Z;"], "20160831085700Z"),  # RFC 8461 §3.1 example
        (["v=STSv1; id=20160831085700Z"], "20160831085700Z"),  # final delimiter optional
        (["v=STSv1;id=a"], "a"),  # *WSP around ";" may be empty
        (["v=STSv1 ;\tid=abc\t; "], "abc"),  # ... or spaces and tabs
        (["v=STSv1; id=abc "], "abc"),  # trailing whitespace tolerated
        (["v=STSv1; id=" + "A1" * 16], "A1" * 16),  # 32 characters is the longest id
        (["v=STSv1; id=a; ext=value; x.y-z_1=!#:<>~"], "a"),  # extensions are ignored
        (["v=STSv1; foo=bar; id=late"], "late"),  # id need not come first
        (["v=STSv1; id=first; id=second"], "first"),  # §3.2: of a duplicate, the first
        (["v=spf1 -all", "v=STSv1; id=x1"], "x1"),  # other TXT records are discarded
        (["v=STSv10; id=a", "v=STSv1; id=b"], "b"),  # "v=STSv10" is not "v=STSv1"
        ([" v=STSv1; id=a", "v=STSv1; id=b"], "b"),  # must *begin* with v=STSv1
        ("v=STSv1; id=solo", "solo"),  # a bare str is one record, not characters
    ],
)
def test_parse_txt(records: list[str], policy_id: str) -> None:
    assert parse_txt(records) == policy_id


@pytest.mark.parametrize(
    "records",
    [
        [],  # NODATA: no record
        ["v=spf1 -all"],  # no MTA-STS record
        ["v=STSv1; id=a", "v=STSv1; id=b"],  # two records: "not one" -> no policy
        ["v=STSv1; id=a", "v=STSv1; id=a"],  # even if they agree
        ["v=STSv1"],  # no id
        ["v=STSv1;"],
        ["v=STSv1; ext=1"],
        ["v=STSv1; id="],  # empty id
        ["v=STSv1; id=" + "a" * 33],  # id too long
        ["v=STSv1; id=test-123"],  # id is letters and digits only
        ["v=STSv1; id=a b"],
        ["v=STSv1; id =a"],
        ["v=STSv1 id=a"],  # no delimiter after the version
        ["v=STSv1; id=a;;"],  # empty field
        ["v=STSv1; id=a; more="],  # empty extension value
        ["v=STSv1; id=a; test==x"],  # "=" not allowed in a value
        ["v=STSv1; id=a; _x=1"],  # extension names start with a letter or digit
        ["v=STSv1; id=a; " + "e" * 33 + "=1"],  # extension name too long
        ["v=STSv1; id=a\r\n"],  # control characters
        ["V=STSv1; id=a"],  # %s"v=STSv1": case-sensitive
        ["v=stsv1; id=a"],
        ["v=STSv1; ID=a"],  # %s"id=" is case-sensitive: an extension, so no id
    ],
)
def test_parse_txt_rejects(records: list[str]) -> None:
    with pytest.raises(StsRecordError) as raised:
        parse_txt(records)
    assert raised.value.reason == "sts-policy-invalid"


# --- §3.2 policies -----------------------------------------------------------------------

RFC_EXAMPLE = (
    "version: STSv1\r\n"
    "mode: enforce\r\n"
    "mx: mail.example.com\r\n"
    "mx: *.example.net\r\n"
    "mx: backupmx.example.com\r\n"
    "max_age: 604800\r\n"
)  # RFC 8461 §3.2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            RFC_EXAMPLE,
            StsPolicy(
                StsMode.ENFORCE,
                ("mail.example.com", "*.example.net", "backupmx.example.com"),
                604800,
            ),
        ),
        (
            RFC_EXAMPLE.replace("\r\n", "\n"),  # LF is as good as CRLF (errata 6253)
            StsPolicy(
                StsMode.ENFORCE,
                ("mail.example.com", "*.example.net", "backupmx.example.com"),
                604800,
            ),
        ),
        (
            "version: STSv1\nmode: testing\nmx: mx.example.com\nmax_age: 86400",  # no final EOL
            StsPolicy(StsMode.TESTING, ("mx.example.com",), 86400),
        ),
        (
            "version: STSv1\r\nmode: testing\nmx: mx.example.com\r\nmax_age: 86400\n",  # mixed
            StsPolicy(StsMode.TESTING, ("mx.example.com",), 86400),
        ),
        (
            "version:STSv1\nmode:\tenforce \t\nmx:  \t *.Example.COM.\nmax_age: 0 \n",  # WSP
            StsPolicy(StsMode.ENFORCE, ("*.example.com",), 0),
        ),
        (
            "version: STSv1\nmode: none\nmax_age: 86400\n",  # mode none needs no mx
            StsPolicy(StsMode.NONE, (), 86400),
        ),
        (
            "mode: enforce\nmax_age: 31557600\nmx: a.example\nversion: STSv1\n",  # any order
            StsPolicy(StsMode.ENFORCE, ("a.example",), MAX_MAX_AGE),
        ),
        (
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 31557601\n",  # capped
            StsPolicy(StsMode.ENFORCE, ("a.example",), MAX_MAX_AGE),
        ),
        (
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 9999999999\n",  # 10 digits
            StsPolicy(StsMode.ENFORCE, ("a.example",), MAX_MAX_AGE),
        ),
        (
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 0000086400\n",
            StsPolicy(StsMode.ENFORCE, ("a.example",), 86400),
        ),
        (
            # §3.2: of a duplicated field other than mx, "all entries except for the first
            # SHALL be ignored".
            "version: STSv1\nmode: enforce\nmode: none\nmx: a.example\nmax_age: 60\n"
            "max_age: x\nversion: STSv2\n",  # ignored, so not even checked
            StsPolicy(StsMode.ENFORCE, ("a.example",), 60),
        ),
        (
            "version: STSv1\nmode: enforce\nmx: a.example\nmx: b.example\nmx: A.example\n"
            "max_age: 60\n",  # mx repeats; a repeated pattern is kept once
            StsPolicy(StsMode.ENFORCE, ("a.example", "b.example"), 60),
        ),
        (
            "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 60\n"
            "comment: ünïcode is fine here\nx-y.z_1: a=b;c\nMode: none\n",  # unknown keys
            StsPolicy(StsMode.ENFORCE, ("a.example",), 60),
        ),
        (
            "\nversion: STSv1\n\n  \nmode: enforce\r\n\r\nmx: a.example\nmax_age: 60\n\n\n",
            StsPolicy(StsMode.ENFORCE, ("a.example",), 60),  # blank lines skipped
        ),
    ],
)
def test_parse_policy(text: str, expected: StsPolicy) -> None:
    assert parse_policy(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\r\n\r\n",
        "mode: enforce\nmx: a.example\nmax_age: 60\n",  # no version
        "version: STSv1\nmx: a.example\nmax_age: 60\n",  # no mode
        "version: STSv1\nmode: enforce\nmx: a.example\n",  # no max_age
        "version: STSv1\nmode: enforce\nmax_age: 60\n",  # enforce needs mx
        "version: STSv1\nmode: testing\nmax_age: 60\n",  # testing needs mx
        "version: STSv2\nmode: none\nmax_age: 60\n",
        "version: STSv10\nmode: none\nmax_age: 60\n",
        "version: stsv1\nmode: none\nmax_age: 60\n",  # values are case-sensitive
        "version: STSv1\nmode: Enforce\nmx: a.example\nmax_age: 60\n",
        "version: STSv1\nmode: report\nmx: a.example\nmax_age: 60\n",  # pre-RFC drafts
        "Version: STSv1\nmode: none\nmax_age: 60\n",  # names too: "Version" is unknown
        "version: STSv1\nmode: none\nmax_age: -1\n",
        "version: STSv1\nmode: none\nmax_age: 1.5\n",
        "version: STSv1\nmode: none\nmax_age: 01234567890\n",  # 11 digits
        "version: STSv1\nmode: none\nmax_age: \u0664\u0662\n",  # non-ASCII digits
        "version: STSv1\nmode: none\nmax_age: 1 2\n",
        "version: STSv1\nmode: none\nmax_age: 60\ngarbage\n",  # every line is a field
        "version: STSv1\nmode: none\nmax_age: 60\n  mx: a.example\n",  # no leading WSP
        "version STSv1\nmode: none\nmax_age: 60\n",
        "version: STSv1\nmode: none\nmax_age: 60\next:\n",  # empty value
        "version: STSv1\nmode: none\nmax_age: 60\n_ext: x\n",
        "version: STSv1\nmode: none\nmax_age: 60\n" + "e" * 33 + ": x\n",
        "version: STSv1\nmode: none\nmax_age: 60\next: a\x00b\n",  # control characters
        "version: STSv1\rmode: none\rmax_age: 60\r",  # bare CR is not a line end
        "version: STSv1\nmode: enforce\nmax_age: 60\nmx:\n",
        "version: STSv1\nmode: enforce\nmax_age: 60\nmx: *.*.example\n",
        "version: STSv1\nmode: enforce\nmax_age: 60\nmx: **.example\n",
        "version: STSv1\nmode: enforce\nmax_age: 60\nmx: mail.*.example\n",
        "version: STSv1\nmode: enforce\nmax_age: 60\nmx: *\n",
        "version: STSv1\nmode: enforce\nmax_age: 60\nmx: -a.example\n",
        "version: STSv1\nmode: enforce\nmax_age: 60\nmx: a-.example\n",
        "version: STSv1\nmode: enforce\nmax_age: 60\nmx: a..example\n",
        "version: STSv1\nmode: enforce\nmax_age: 60\nmx: a.example b.example\n",
        "version: STSv1\nmode: enforce\nmax_age: 60\nmx: møx.example\n",  # A-labels only
        "version: STSv1\nmode: enforce\nmax_age: 60\nmx: 192.0.2.1:25\n",
    ],
)
def test_parse_policy_rejects(text: str) -> None:
    with pytest.raises(StsPolicyError) as raised:
        parse_policy(text)
    assert raised.value.reason == "sts-policy-invalid"


def test_parse_policy_rejects_oversized_text() -> None:
    head = "version: STSv1\nmode: none\nmax_age: 60\n"
    filler = "x: " + "y" * 70 + "\n"
    text = head + filler * (MAX_POLICY_BYTES // len(filler))
    assert parse_policy(text) == StsPolicy(StsMode.NONE, (), 60)  # just under the cap
    with pytest.raises(StsPolicyError):
        parse_policy(text + filler)
    with pytest.raises(StsPolicyError):  # counted in UTF-8 bytes, not characters
        parse_policy(head + "x: " + "é" * (MAX_POLICY_BYTES // 2) + "\n")


# --- §4.1 MX patterns --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "host", "ok"),
    [
        ("mail.example.com", "mail.example.com", True),
        ("mail.example.com", "MAIL.Example.COM", True),  # case-insensitive
        ("Mail.Example.com", "mail.example.com", True),
        ("mail.example.com.", "mail.example.com", True),  # final dots ignored
        ("mail.example.com", "mail.example.com.", True),
        ("mail.example.com", "example.com", False),
        ("mail.example.com", "xmail.example.com", False),
        ("mail.example.com", "a.mail.example.com", False),
        ("*.example.net", "mx1.example.net", True),
        ("*.example.net", "MX1.EXAMPLE.NET.", True),
        ("*.example.net", "example.net", False),  # the wildcard covers a label...
        ("*.example.net", "a.b.example.net", False),  # ...exactly one (RFC 8461 §4.1)
        ("*.example.net", ".example.net", False),  # an empty label is not a label
        ("*.example.net", "mx1.example.network", False),
        ("*.example.net", "mx1example.net", False),
        ("*.example.com", "example.com", False),
        ("*.example.com", "a.b.example.com", False),
        ("*.", "localhost", False),
        ("", "", False),
    ],
)
def test_mx_matches(pattern: str, host: str, ok: bool) -> None:
    assert mx_matches(pattern, host) is ok


def test_policy_allows_any_matching_pattern() -> None:
    policy = parse_policy(RFC_EXAMPLE)
    assert policy.allows("mail.example.com")
    assert policy.allows("mx7.example.net")
    assert policy.allows("BackupMX.example.com.")
    assert not policy.allows("mx7.example.com")
    assert not policy.allows("a.b.example.net")
    assert not StsPolicy(StsMode.NONE, (), 60).allows("mail.example.com")


# --- properties --------------------------------------------------------------------------

_LINE_PIECES = st.sampled_from(
    [
        "version: STSv1",
        "mode: enforce",
        "mode: testing",
        "mode: none",
        "mx: mail.example.com",
        "mx: *.example.net",
        "max_age: 86400",
        "max_age:",
        "ext: v",
        ":",
        "",
        " ",
        "\r",
    ]
)


@given(st.text())
def test_parse_policy_raises_only_sts_errors_on_any_text(text: str) -> None:
    try:
        policy = parse_policy(text)
    except StsError:
        return
    assert 0 <= policy.max_age <= 31557600  # RFC 8461 §3.2
    assert policy.mx or policy.mode is StsMode.NONE


@given(st.lists(st.one_of(_LINE_PIECES, st.text(max_size=30)), max_size=12))
def test_parse_policy_raises_only_sts_errors_on_near_policies(lines: list[str]) -> None:
    try:
        policy = parse_policy("\n".join(lines))
    except StsError:
        return
    assert 0 <= policy.max_age <= MAX_MAX_AGE
    assert policy.mode is StsMode.NONE or policy.mx


@given(st.lists(st.text(), max_size=4))
def test_parse_txt_raises_only_sts_errors(records: list[str]) -> None:
    try:
        policy_id = parse_txt(records)
    except StsError:
        return
    assert re.fullmatch(r"[A-Za-z0-9]{1,32}", policy_id)


@given(
    st.lists(
        st.sampled_from(["v=STSv1", ";", " ", "\t", "id=", "abc", "ID", "=", "x", "9"]),
        max_size=10,
    ).map("".join)
)
def test_parse_txt_raises_only_sts_errors_on_near_records(record: str) -> None:
    try:
        parse_txt([record])
    except StsError:
        return


_LABELS = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_HOSTS = st.lists(_LABELS, min_size=1, max_size=4).map(".".join)
_PATTERNS = st.one_of(_HOSTS, _HOSTS.map(lambda host: f"*.{host}"))


@st.composite
def _policies(draw: st.DrawFn) -> StsPolicy:
    mode = draw(st.sampled_from(StsMode))
    patterns = draw(st.lists(_PATTERNS, min_size=0 if mode is StsMode.NONE else 1, unique=True))
    return StsPolicy(mode, tuple(patterns), draw(st.integers(0, MAX_MAX_AGE)))


def _render(policy: StsPolicy, eol: str, extension: str | None) -> list[str]:
    lines = ["version: STSv1", f"mode: {policy.mode.value}", f"max_age: {policy.max_age}"]
    lines += [f"mx: {pattern}" for pattern in policy.mx]
    if extension is not None:
        lines.append(f"x-ext: {extension}")
    return [line + eol for line in lines]


@given(
    _policies(),
    st.sampled_from(["\n", "\r\n"]),
    st.permutations(range(10)),
    st.none() | st.from_regex(r"[!-~]([ !-~]*[!-~])?", fullmatch=True),
)
def test_valid_policy_round_trips(
    policy: StsPolicy, eol: str, order: list[int], extension: str | None
) -> None:
    lines = _render(policy, eol, extension)
    # Fields may come in any order; the mx lines keep theirs.
    head = [line for line in lines if not line.startswith("mx:")]
    head = [head[i] for i in order if i < len(head)]
    text = "".join(head + [line for line in lines if line.startswith("mx:")])
    assert parse_policy(text) == policy


@given(st.lists(_PATTERNS, min_size=1), _HOSTS)
def test_a_host_matches_a_policy_iff_one_pattern_matches(patterns: list[str], host: str) -> None:
    policy = StsPolicy(StsMode.ENFORCE, tuple(patterns), 60)
    assert policy.allows(host) == any(mx_matches(p, host) for p in patterns)
    assert policy.allows(host.upper() + ".") == policy.allows(host)


@given(_LABELS, _HOSTS)
def test_wildcard_is_one_label(label: str, suffix: str) -> None:
    assert mx_matches(f"*.{suffix}", f"{label}.{suffix}")
    assert not mx_matches(f"*.{suffix}", suffix)
    assert not mx_matches(f"*.{suffix}", f"{label}.{label}.{suffix}")
