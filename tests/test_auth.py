"""The AuthPolicy engine (tokengateway.auth): Authorino's behaviour, without HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tokengateway.auth import (
    MISSING,
    AuthConfigError,
    AuthDecision,
    AuthEngine,
    AuthRequest,
    SecretRecord,
    SelectorError,
    compile_auth,
    compile_selector,
)

SYSTEM_NS = "kuadrant-system"
POLICY = "gateway-system/trlp-tutorial-llm-api-keys"
LABELS = {"authorino.kuadrant.io/managed-by": "authorino", "app": "my-llm"}

TUTORIAL_RULES: dict[str, Any] = {
    "authentication": {
        "api-key-users": {
            "apiKey": {"selector": {"matchLabels": {"app": "my-llm"}}},
            "credentials": {"authorizationHeader": {"prefix": "APIKEY"}},
        }
    },
    "response": {
        "success": {
            "filters": {
                "identity": {
                    "json": {
                        "properties": {
                            "groups": {
                                "selector": r"auth.identity.metadata.annotations.kuadrant\.io/groups"
                            },
                            "userid": {
                                "selector": r"auth.identity.metadata.annotations.secret\.kuadrant\.io/user-id"
                            },
                        }
                    }
                }
            }
        }
    },
    "authorization": {
        "allow-groups": {
            "opa": {
                "rego": (
                    'groups := split(object.get(input.auth.identity.metadata.annotations, "kuadrant.io/groups", ""), ",")\n'
                    'allow { groups[_] == "free" }\n'
                    'allow { groups[_] == "gold" }\n'
                )
            }
        }
    },
}


def secret(
    name: str,
    key: str,
    group: str,
    user: str,
    namespace: str = SYSTEM_NS,
    labels: dict[str, str] | None = None,
) -> SecretRecord:
    return SecretRecord(
        namespace=namespace,
        name=name,
        labels=dict(LABELS if labels is None else labels),
        annotations={"kuadrant.io/groups": group, "secret.kuadrant.io/user-id": user},
        data={"api_key": key},
    )


SECRETS = [
    secret("trlp-tutorial-api-key-free-user-1", "iamafreeuser", "free", "user-1"),
    secret("trlp-tutorial-api-key-gold-user-1", "iamagolduser", "gold", "user-2"),
    secret("silver-user", "iamasilveruser", "silver", "user-9"),
    secret("elsewhere", "iamelsewhere", "gold", "user-7", namespace="team-a"),
]


def request(
    headers: dict[str, str] | None = None,
    path: str = "/v1/chat/completions",
    method: str = "POST",
    host: str = "trlp-tutorial.example.com",
) -> AuthRequest:
    hdrs = {"host": host, "user-agent": "pytest", **(headers or {})}
    url_path, _, query = path.partition("?")
    well_known = {
        "request": {
            "id": "req-1",
            "method": method,
            "path": path,
            "url_path": url_path,
            "host": host,
            "scheme": "http",
            "query": query,
            "headers": hdrs,
            "time": "2025-01-01T00:00:00Z",
            "size": 0,
            "protocol": "HTTP/1.1",
            "useragent": "pytest",
        },
        "source": {"address": "10.0.0.1", "port": 40000, "remote_address": "10.0.0.1"},
        "destination": {"address": "10.0.0.2", "port": 8080},
    }
    return AuthRequest(
        method=method,
        scheme="http",
        host=host,
        path=path,
        headers=hdrs,
        source_address="10.0.0.1",
        source_port=40000,
        destination_address="10.0.0.2",
        destination_port=8080,
        request_id="req-1",
        well_known=well_known,
    )


def engine(
    rules: dict[str, Any], when: list[dict[str, str]] | None = None, **kw: Any
) -> AuthEngine:
    return compile_auth("ns/policy", rules, when, kw.pop("secrets", SECRETS), SYSTEM_NS, **kw)


def apikey(**credentials: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {"apiKey": {"selector": {"matchLabels": {"app": "my-llm"}}}}
    if credentials:
        rule["credentials"] = credentials
    return rule


def header(decision: AuthDecision, name: str) -> list[str]:
    return [v for k, v in decision.deny_headers if k.lower() == name.lower()]


@pytest.fixture(scope="module")
def tutorial() -> AuthEngine:
    return compile_auth(POLICY, TUTORIAL_RULES, None, SECRETS, SYSTEM_NS)


# --- the tutorial ------------------------------------------------------------------------------


def test_tutorial_free_and_gold_users_are_allowed(tutorial: AuthEngine) -> None:
    free = tutorial.evaluate(request({"authorization": "APIKEY iamafreeuser"}))
    assert free.allowed and free.status == 200
    assert free.auth == {"identity": {"groups": "free", "userid": "user-1"}}
    assert free.identity_source == "api-key-users"
    assert free.identity is not None
    assert free.identity["metadata"]["name"] == "trlp-tutorial-api-key-free-user-1"
    assert free.identity["data"] == {"api_key": "***REDACTED***"}
    gold = tutorial.evaluate(request({"authorization": "APIKEY iamagolduser"}))
    assert gold.allowed
    assert gold.auth == {"identity": {"groups": "gold", "userid": "user-2"}}


def test_tutorial_wrong_key_is_401_with_challenge(tutorial: AuthEngine) -> None:
    d = tutorial.evaluate(request({"authorization": "APIKEY wrong-key"}))
    assert not d.allowed and d.status == 401
    assert d.reason == "the API Key provided is invalid"
    assert header(d, "WWW-Authenticate") == ['APIKEY realm="api-key-users"']
    assert header(d, "X-Ext-Auth-Reason") == ["the API Key provided is invalid"]
    assert d.auth == {} and d.identity is None


def test_tutorial_missing_credential_is_401(tutorial: AuthEngine) -> None:
    for headers in (
        {},
        {"authorization": "Bearer iamafreeuser"},
        {"authorization": "apikey iamafreeuser"},
    ):
        d = tutorial.evaluate(request(headers))
        assert d.status == 401, headers
        assert d.reason == "credential not found"
        assert header(d, "WWW-Authenticate") == ['APIKEY realm="api-key-users"']


def test_tutorial_group_outside_the_rego_is_403(tutorial: AuthEngine) -> None:
    d = tutorial.evaluate(request({"authorization": "APIKEY iamasilveruser"}))
    assert not d.allowed and d.status == 403
    assert d.reason == "Unauthorized"
    assert header(d, "X-Ext-Auth-Reason") == ["Unauthorized"]
    assert header(d, "WWW-Authenticate") == []
    assert d.identity_source == "api-key-users"


def test_secret_in_another_namespace_needs_all_namespaces() -> None:
    d = engine({"authentication": {"k": apikey()}}).evaluate(
        request({"authorization": "Bearer iamelsewhere"})
    )
    assert d.status == 401 and d.reason == "the API Key provided is invalid"
    rule = apikey()
    rule["apiKey"]["allNamespaces"] = True
    d = engine({"authentication": {"k": rule}}).evaluate(
        request({"authorization": "Bearer iamelsewhere"})
    )
    assert d.allowed and d.identity is not None
    assert d.identity["metadata"]["namespace"] == "team-a"


def test_label_selector_expressions_and_empty_keys() -> None:
    secrets = [
        secret("a", "key-a", "free", "u1", labels={"tier": "free", "app": "x"}),
        secret("b", "key-b", "gold", "u2", labels={"tier": "gold", "app": "x"}),
        secret("c", "key-c", "gold", "u3", labels={"tier": "gold"}),
        secret("d", "", "gold", "u4", labels={"tier": "gold", "app": "x"}),
    ]
    rule = {
        "apiKey": {
            "selector": {
                "matchExpressions": [
                    {"key": "tier", "operator": "In", "values": ["gold", "silver"]},
                    {"key": "app", "operator": "Exists"},
                ]
            }
        }
    }
    eng = engine({"authentication": {"k": rule}}, secrets=secrets)
    assert eng.api_keys() == {"k": ["kuadrant-system/b"]}  # d has an empty api_key
    rule["apiKey"]["selector"] = {
        "matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["gold"]}]
    }
    assert engine({"authentication": {"k": rule}}, secrets=secrets).api_keys() == {
        "k": ["kuadrant-system/a"]
    }
    rule["apiKey"]["selector"] = {"matchExpressions": [{"key": "app", "operator": "DoesNotExist"}]}
    assert engine({"authentication": {"k": rule}}, secrets=secrets).api_keys() == {
        "k": ["kuadrant-system/c"]
    }
    rule["apiKey"]["selector"] = {"matchExpressions": [{"key": "app", "operator": "Near"}]}
    with pytest.raises(AuthConfigError, match="unknown operator"):
        engine({"authentication": {"k": rule}}, secrets=secrets)


# --- credential locations ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("credentials", "good", "challenge"),
    [
        (None, ({"authorization": "Bearer iamafreeuser"}, ""), 'Bearer realm="k"'),
        (
            {"authorizationHeader": {"prefix": "Token"}},
            ({"authorization": "Token iamafreeuser"}, ""),
            'Token realm="k"',
        ),
        (
            {"customHeader": {"name": "X-API-KEY"}},
            ({"x-api-key": "iamafreeuser"}, ""),
            'X-API-KEY realm="k"',
        ),
        (
            {"queryString": {"name": "api_key"}},
            ({}, "?x=1&api_key=iamafreeuser&api_key=other"),
            'api_key realm="k"',
        ),
        (
            {"cookie": {"name": "session"}},
            ({"cookie": "other=1; session=iamafreeuser; x=2"}, ""),
            'session realm="k"',
        ),
    ],
)
def test_credential_locations(
    credentials: dict[str, Any] | None, good: tuple[dict[str, str], str], challenge: str
) -> None:
    rule = apikey(**credentials) if credentials else apikey()
    eng = engine({"authentication": {"k": rule}})
    headers, query = good
    d = eng.evaluate(request(headers, path="/v1/models" + query))
    assert d.allowed, d
    missing = eng.evaluate(request({}, path="/v1/models"))
    assert missing.status == 401 and missing.reason == "credential not found"
    assert header(missing, "WWW-Authenticate") == [challenge]
    wrong_headers = {k: v.replace("iamafreeuser", "nope") for k, v in headers.items()}
    wrong = eng.evaluate(
        request(wrong_headers, path="/v1/models" + query.replace("iamafreeuser", "nope"))
    )
    assert wrong.status == 401 and wrong.reason == "the API Key provided is invalid"


def test_query_string_credential_is_url_decoded_and_empty_means_absent() -> None:
    secrets = [secret("s", "a b+c/d", "free", "u")]
    eng = engine({"authentication": {"k": apikey(queryString={"name": "key"})}}, secrets=secrets)
    assert eng.evaluate(request(path="/x?key=a+b%2Bc%2Fd")).allowed
    assert eng.evaluate(request(path="/x?key=")).reason == "credential not found"


def test_custom_header_present_but_empty_is_an_invalid_key() -> None:
    eng = engine({"authentication": {"k": apikey(customHeader={"name": "X-Key"})}})
    assert eng.evaluate(request({"x-key": ""})).reason == "the API Key provided is invalid"


def test_several_sources_one_challenge_each_and_errors_by_rule() -> None:
    rules = {
        "authentication": {
            "header-keys": apikey(authorizationHeader={"prefix": "APIKEY"}),
            "query-keys": apikey(queryString={"name": "key"}),
        }
    }
    eng = engine(rules)
    d = eng.evaluate(request({"authorization": "APIKEY nope"}))
    assert d.status == 401
    assert header(d, "WWW-Authenticate") == ['APIKEY realm="header-keys"', 'key realm="query-keys"']
    assert json.loads(d.reason or "") == {
        "header-keys": "the API Key provided is invalid",
        "query-keys": "credential not found",
    }
    assert d.reason == (
        '{"header-keys":"the API Key provided is invalid","query-keys":"credential not found"}'
    )
    ok = eng.evaluate(request(path="/x?key=iamagolduser"))
    assert ok.allowed and ok.identity_source == "query-keys"


def test_priority_then_name_order_first_success_wins() -> None:
    secrets = [secret("s", "k", "free", "u")]
    rules = {
        "authentication": {
            "a-late": {**apikey(), "priority": 1, "defaults": {"from": {"value": "a-late"}}},
            "b-early": {**apikey(), "defaults": {"from": {"value": "b-early"}}},
        },
        "response": {
            "success": {
                "filters": {
                    "who": {"json": {"properties": {"from": {"selector": "auth.identity.from"}}}}
                }
            }
        },
    }
    d = engine(rules, secrets=secrets).evaluate(request({"authorization": "Bearer k"}))
    assert d.identity_source == "b-early"
    assert d.auth == {"who": {"from": "b-early"}}


def test_source_when_skips_it_and_a_single_skipped_source_reports_empty_errors() -> None:
    rule = {**apikey(), "when": [{"selector": "request.method", "operator": "eq", "value": "GET"}]}
    eng = engine({"authentication": {"k": rule}})
    d = eng.evaluate(request({"authorization": "Bearer iamafreeuser"}, method="POST"))
    assert d.status == 401 and d.reason == "{}"
    assert eng.evaluate(request({"authorization": "Bearer iamafreeuser"}, method="GET")).allowed


def test_anonymous_plain_and_no_authentication() -> None:
    d = engine({}).evaluate(request())
    assert d.allowed and d.identity == {"anonymous": True} and d.identity_source == "anonymous"
    d = engine({"authentication": {"anon": {"anonymous": {}}}}).evaluate(request())
    assert d.allowed and d.identity_source == "anon"
    plain = {"plain": {"selector": "request.headers.x-user"}}
    who = {"success": {"filters": {"who": {"plain": {"selector": "auth.identity"}}}}}
    eng = engine({"authentication": {"p": plain}, "response": who})
    d = eng.evaluate(request({"x-user": "alice"}))
    assert d.allowed and d.auth == {"who": "alice"}
    assert d.identity is None  # only object identities are reported
    missing = eng.evaluate(request())
    assert missing.status == 401 and missing.reason == "could not retrieve identity object or null"
    assert header(missing, "WWW-Authenticate") == ['request.headers.x-user realm="p"']
    eng = engine({"authentication": {"p": {"plain": {"expression": "request.headers['x-user']"}}}})
    assert eng.evaluate(request({"x-user": "bob"})).allowed


def test_identity_defaults_and_overrides() -> None:
    rules = {
        "authentication": {
            "k": {
                **apikey(),
                "defaults": {"kind": {"value": "ignored"}, "tier": {"value": "basic"}},
                "overrides": {
                    "user": {
                        "selector": r"auth.identity.metadata.annotations.secret\.kuadrant\.io/user-id"
                    }
                },
            }
        },
        "authorization": {
            "user-1-only": {
                "patternMatching": {
                    "patterns": [
                        {"selector": "auth.identity.user", "operator": "eq", "value": "user-1"},
                        {"selector": "auth.identity.kind", "operator": "eq", "value": "Secret"},
                        {"selector": "auth.identity.tier", "operator": "eq", "value": "basic"},
                    ]
                }
            }
        },
    }
    eng = engine(rules)
    d = eng.evaluate(request({"authorization": "Bearer iamafreeuser"}))
    assert d.allowed, d.reason
    assert d.identity is not None and d.identity["user"] == "user-1"
    assert d.identity["data"] == {}  # the key is not kept, not even redacted
    assert eng.evaluate(request({"authorization": "Bearer iamagolduser"})).status == 403


# --- authorization -----------------------------------------------------------------------------


def test_rego_v1_syntax_imports_and_package_line() -> None:
    rego = (
        "package ignored.by.authorino\n"
        'allow if { input.auth.identity.metadata.annotations["kuadrant.io/groups"] in {"gold"} }\n'
        "import rego.v1\n"
    )
    eng = engine(
        {
            "authorization": {"r": {"opa": {"rego": rego, "version": "v1"}}},
            "authentication": {"k": apikey()},
        }
    )
    assert eng.evaluate(request({"authorization": "Bearer iamagolduser"})).allowed
    assert eng.evaluate(request({"authorization": "Bearer iamafreeuser"})).status == 403


def test_rego_reads_request_attributes_and_context() -> None:
    rego = (
        'allow { input.request.method == "GET"; input.context.request.http.path == "/v1/models" }\n'
        'allow { input.request.headers["x-debug"] == "1" }\n'
    )
    eng = engine({"authorization": {"r": {"opa": {"rego": rego}}}})
    assert eng.evaluate(request(method="GET", path="/v1/models")).allowed
    assert eng.evaluate(request(method="POST", path="/v1/models")).status == 403
    assert eng.evaluate(request({"x-debug": "1"}, method="POST")).allowed


def test_rego_only_boolean_true_allows() -> None:
    eng = engine({"authorization": {"r": {"opa": {"rego": 'allow = "yes" { true }'}}}})
    d = eng.evaluate(request())
    assert d.status == 403 and d.reason == "Unauthorized"


def test_rego_all_values_are_visible_to_later_phases() -> None:
    rules = {
        "authorization": {
            "r": {"opa": {"rego": 'tier := "gold"\nallow { true }', "allValues": True}},
            "s": {
                "priority": 1,
                "patternMatching": {
                    "patterns": [
                        {"selector": "auth.authorization.r.tier", "operator": "eq", "value": "gold"}
                    ]
                },
            },
        },
        "response": {
            "success": {
                "filters": {
                    "f": {
                        "json": {"properties": {"tier": {"selector": "auth.authorization.r.tier"}}}
                    }
                }
            }
        },
    }
    d = engine(rules).evaluate(request())
    assert d.allowed, d.reason
    assert d.auth == {"f": {"tier": "gold"}}


@pytest.mark.parametrize(
    ("rego", "fragment"),
    [
        ("allow { input.a == }", "Invalid boolean operator (line 1)"),
        ("x := 1\n\nallow {\n  input.a ==\n}", "(line 4)"),
        ("default allow := true\nallow { true }", "default allow"),
        ("allow { foo(1) }", "Function not found: foo"),
        ("default x = 1\ndefault x = 2\nallow { x == 1 }", "Rego does not compile"),
    ],
)
def test_rego_compile_errors_name_policy_and_rule(rego: str, fragment: str) -> None:
    with pytest.raises(AuthConfigError) as info:
        compile_auth(
            "ns/p", {"authorization": {"my-rule": {"opa": {"rego": rego}}}}, None, [], SYSTEM_NS
        )
    message = str(info.value)
    assert message.startswith("ns/p: rules.authorization.my-rule.opa.rego: ")
    assert fragment in message
    assert info.value.policy == "ns/p"


def test_unsupported_opa_options() -> None:
    with pytest.raises(AuthConfigError, match="unsupported OPA Rego version: v9"):
        engine({"authorization": {"r": {"opa": {"rego": "allow { true }", "version": "v9"}}}})
    with pytest.raises(AuthConfigError, match="externalPolicy"):
        engine({"authorization": {"r": {"opa": {"externalPolicy": {"url": "http://opa"}}}}})


def pm(*patterns: dict[str, Any]) -> AuthEngine:
    return engine({"authorization": {"pm": {"patternMatching": {"patterns": list(patterns)}}}})


@pytest.mark.parametrize(
    ("pattern", "allowed"),
    [
        ({"selector": "request.method", "operator": "eq", "value": "POST"}, True),
        ({"selector": "request.method", "operator": "eq", "value": "GET"}, False),
        ({"selector": "request.method", "operator": "neq", "value": "GET"}, True),
        ({"selector": "request.method", "operator": "neq", "value": "POST"}, False),
        (
            {
                "selector": 'request.headers.x-groups.@extract:{"sep":",","pos":1}',
                "operator": "eq",
                "value": "b",
            },
            True,
        ),
        (
            {"selector": "request.headers.x-tags|@fromstr", "operator": "incl", "value": "beta"},
            True,
        ),
        (
            {"selector": "request.headers.x-tags|@fromstr", "operator": "incl", "value": "gamma"},
            False,
        ),
        (
            {"selector": "request.headers.x-tags|@fromstr", "operator": "excl", "value": "gamma"},
            True,
        ),
        (
            {"selector": "request.headers.x-tags|@fromstr", "operator": "excl", "value": "beta"},
            False,
        ),
        ({"selector": "request.method", "operator": "incl", "value": "POST"}, True),
        (
            {
                "selector": "request.path",
                "operator": "matches",
                "value": "^/v1/(chat/)?completions$",
            },
            True,
        ),
        ({"selector": "request.path", "operator": "matches", "value": "embeddings"}, False),
        ({"selector": "request.missing", "operator": "eq", "value": ""}, True),
        (
            {
                "predicate": "request.method == 'POST' && request.headers['x-groups'].split(',').size() == 2"
            },
            True,
        ),
        ({"predicate": "request.nope == 1"}, False),
    ],
)
def test_pattern_matching_operators(pattern: dict[str, Any], allowed: bool) -> None:
    d = pm(pattern).evaluate(request({"x-groups": "a,b", "x-tags": '["alpha","beta"]'}))
    assert d.allowed is allowed
    if not allowed:
        assert d.status == 403 and d.reason == "Unauthorized"


def test_pattern_matching_all_any_and_refs() -> None:
    get = {"selector": "request.method", "operator": "eq", "value": "GET"}
    post = {"selector": "request.method", "operator": "eq", "value": "POST"}
    models = {"selector": "request.path", "operator": "eq", "value": "/v1/models"}
    assert pm({"any": [get, post]}).evaluate(request()).allowed
    assert not pm({"any": [get, models]}).evaluate(request()).allowed
    assert not pm({"all": [post, models]}).evaluate(request()).allowed
    assert pm({"all": [post, {"any": [get, {"predicate": "true"}]}]}).evaluate(request()).allowed
    rules = {
        "authorization": {"pm": {"patternMatching": {"patterns": [{"patternRef": "is-post"}]}}}
    }
    eng = engine(rules, patterns={"is-post": [post]})
    assert eng.evaluate(request()).allowed
    assert eng.evaluate(request(method="GET")).status == 403
    with pytest.raises(AuthConfigError, match="patternRef 'nope'"):
        engine(
            {"authorization": {"pm": {"patternMatching": {"patterns": [{"patternRef": "nope"}]}}}}
        )
    with pytest.raises(AuthConfigError, match="regular expression"):
        pm({"selector": "request.path", "operator": "matches", "value": "(("})
    with pytest.raises(AuthConfigError, match="unknown operator 'like'"):
        pm({"selector": "request.path", "operator": "like", "value": "x"})


def test_authorization_when_and_priority() -> None:
    rules = {
        "authentication": {"k": apikey()},
        "authorization": {
            "deny-posts-for-free": {
                "when": [{"predicate": "request.method == 'POST'"}],
                "patternMatching": {
                    "patterns": [
                        {
                            "selector": r"auth.identity.metadata.annotations.kuadrant\.io/groups",
                            "operator": "neq",
                            "value": "free",
                        }
                    ]
                },
            },
            "second": {
                "priority": 2,
                "patternMatching": {
                    "patterns": [
                        {
                            "selector": "auth.authorization.deny-posts-for-free",
                            "operator": "neq",
                            "value": "false",
                        }
                    ]
                },
            },
        },
    }
    eng = engine(rules)
    assert (
        eng.evaluate(request({"authorization": "Bearer iamafreeuser"}, method="POST")).status == 403
    )
    assert eng.evaluate(request({"authorization": "Bearer iamafreeuser"}, method="GET")).allowed
    assert eng.evaluate(request({"authorization": "Bearer iamagolduser"}, method="POST")).allowed


def test_top_level_when_false_means_the_policy_does_not_apply() -> None:
    eng = compile_auth(
        POLICY,
        TUTORIAL_RULES,
        [
            {"predicate": 'request.path.startsWith("/v1/chat")'},
            {"predicate": "request.method == 'POST'"},
        ],
        SECRETS,
        SYSTEM_NS,
    )
    skipped = eng.evaluate(request(path="/v1/models", method="GET"))
    assert skipped.allowed and skipped.auth == {} and not skipped.applied
    assert eng.evaluate(request()).status == 401
    with pytest.raises(AuthConfigError, match=r"when\[0\]: invalid CEL predicate"):
        compile_auth(POLICY, TUTORIAL_RULES, [{"predicate": "request.path =="}], SECRETS, SYSTEM_NS)


# --- success responses -------------------------------------------------------------------------


def test_filter_properties_selectors_values_expressions_and_templates() -> None:
    props = {
        "groups": {"selector": r"auth.identity.metadata.annotations.kuadrant\.io/groups"},
        "upper": {
            "selector": r"auth.identity.metadata.annotations.kuadrant\.io/groups.@case:upper"
        },
        "missing": {"selector": "auth.identity.metadata.annotations.nope"},
        "static": {"value": {"a": [1, 2]}},
        "cel": {"expression": "auth.identity.metadata.name + '@' + request.method.lowerAscii()"},
        "greeting": {
            "selector": "Hello, {auth.identity.metadata.annotations.secret\\.kuadrant\\.io/user-id}!"
        },
        "host": {"selector": "context.request.http.host"},
        "key-len": {"selector": "auth.identity.data.api_key|@base64:decode|@this"},
    }
    rules = {
        "authentication": {"k": apikey()},
        "response": {"success": {"filters": {"identity": {"json": {"properties": props}}}}},
    }
    d = engine(rules).evaluate(request({"authorization": "Bearer iamagolduser"}))
    assert d.allowed
    assert d.auth["identity"] == {
        "groups": "gold",
        "upper": "GOLD",
        "missing": None,
        "static": {"a": [1, 2]},
        "cel": "trlp-tutorial-api-key-gold-user-1@post",
        "greeting": "Hello, user-2!",
        "host": "trlp-tutorial.example.com",
        "key-len": None,  # Authorino would expose the key; we keep only its digest
    }


def test_filter_with_failing_expression_is_dropped_and_when_gates_filters() -> None:
    rules = {
        "response": {
            "success": {
                "filters": {
                    "broken": {"json": {"properties": {"x": {"expression": "request.nope + 1"}}}},
                    "only-get": {
                        "when": [{"predicate": "request.method == 'GET'"}],
                        "plain": {"value": "yes"},
                    },
                    "renamed": {"key": "limits", "plain": {"selector": "request.method"}},
                }
            }
        }
    }
    eng = engine(rules)
    assert eng.evaluate(request()).auth == {"limits": "POST"}
    assert eng.evaluate(request(method="GET")).auth == {"limits": "GET", "only-get": "yes"}


def test_success_headers() -> None:
    rules = {
        "authentication": {"k": apikey()},
        "response": {
            "success": {
                "headers": {
                    "x-user": {
                        "plain": {
                            "selector": r"auth.identity.metadata.annotations.secret\.kuadrant\.io/user-id"
                        }
                    },
                    "identity": {
                        "key": "x-identity",
                        "json": {"properties": {"b": {"value": 1}, "a": {"value": "<x>"}}},
                    },
                }
            }
        },
    }
    d = engine(rules).evaluate(request({"authorization": "Bearer iamafreeuser"}))
    assert dict(d.success_headers) == {
        "x-user": "user-1",
        "x-identity": '{"a":"\\u003cx\\u003e","b":1}',
    }
    assert d.headers == d.success_headers


# --- custom denials ----------------------------------------------------------------------------


def test_custom_unauthenticated_and_unauthorized() -> None:
    rules = {
        **TUTORIAL_RULES,
        "response": {
            **TUTORIAL_RULES["response"],
            "unauthenticated": {
                "code": 302,
                "headers": {
                    "Location": {"selector": "https://login.example.com?next={request.path}"}
                },
                "message": {"value": "please log in"},
                "body": {"value": "<html>login</html>"},
            },
            "unauthorized": {
                "code": 429,
                "message": {
                    "expression": "'group ' + auth.identity.metadata.annotations['kuadrant.io/groups'] + ' is not allowed'"
                },
                "headers": {
                    "X-Group": {
                        "selector": r"auth.identity.metadata.annotations.kuadrant\.io/groups"
                    }
                },
            },
        },
    }
    eng = compile_auth(POLICY, rules, None, SECRETS, SYSTEM_NS)
    d = eng.evaluate(request({"authorization": "APIKEY nope"}))
    assert d.status == 302 and d.message == "please log in" and d.body == "<html>login</html>"
    assert d.reason == "please log in"
    # custom headers replace the challenge
    assert d.deny_headers == [
        ("Location", "https://login.example.com?next=/v1/chat/completions"),
        ("X-Ext-Auth-Reason", "please log in"),
    ]
    d = eng.evaluate(request({"authorization": "APIKEY iamasilveruser"}))
    assert d.status == 429 and d.reason == "group silver is not allowed"
    assert d.deny_headers == [
        ("X-Group", "silver"),
        ("X-Ext-Auth-Reason", "group silver is not allowed"),
    ]
    assert d.headers == d.deny_headers
    with pytest.raises(AuthConfigError, match="300 to 599"):
        engine({"response": {"unauthorized": {"code": 200}}})


# --- secrecy -----------------------------------------------------------------------------------


def test_api_keys_never_appear_in_reprs_or_errors(tutorial: AuthEngine) -> None:
    keys = ("iamafreeuser", "iamagolduser", "wrong-key")
    texts = [repr(tutorial), repr(SECRETS), str(SECRETS[0])]
    for h in ("APIKEY iamafreeuser", "APIKEY wrong-key", "APIKEY iamasilveruser"):
        req = request({"authorization": h}, path="/x?api_key=iamagolduser")
        d = tutorial.evaluate(req)
        texts += [repr(req), str(req), repr(d), str(d), repr(d.identity), repr(d.deny_headers)]
    with pytest.raises(AuthConfigError) as info:
        compile_auth(
            "ns/p",
            {
                "authentication": {"k": {**apikey(), "jwt": {}}},
                "authorization": {"r": {"opa": {"rego": "allow {"}}},
            },
            None,
            SECRETS,
            SYSTEM_NS,
        )
    texts.append(str(info.value))
    blob = "\n".join(texts)
    for key in keys:
        assert key not in blob


# --- unsupported and malformed -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "fragment"),
    [
        (
            {"authentication": {"k8s": {"kubernetesTokenReview": {}}}},
            "rules.authentication.k8s: kubernetesTokenReview authentication is not supported",
        ),
        (
            {"authentication": {"k8s": {"kubernetesTokenReview": {"audiences": ["x"]}}}},
            "kubernetesTokenReview authentication",
        ),
        ({"authentication": {"x": {"credentials": {}}}}, "unknown authentication method"),
        (
            {"metadata": {"user-info": {"userInfo": {"identitySource": "oidc"}}}},
            "rules.metadata.user-info: userInfo metadata is not supported",
        ),
        ({"callbacks": {"notify": {"http": {"url": "http://x"}}}}, "callbacks are not supported"),
        (
            {"authorization": {"sar": {"kubernetesSubjectAccessReview": {"user": {"value": "x"}}}}},
            "kubernetesSubjectAccessReview authorization",
        ),
        ({"authorization": {"db": {"spicedb": {"endpoint": "x"}}}}, "spicedb authorization"),
        (
            {"response": {"success": {"headers": {"w": {"wristband": {"issuer": "x"}}}}}},
            "wristband",
        ),
        ({"bogus": {}}, "rules.bogus: unknown section"),
        (
            {
                "authentication": {
                    "k": {
                        **apikey(),
                        "credentials": {"cookie": {"name": "a"}, "queryString": {"name": "b"}},
                    }
                }
            },
            "exactly one location",
        ),
        (
            {
                "response": {
                    "success": {
                        "filters": {"f": {"json": {"properties": {"p": {"expression": "1 +"}}}}}
                    }
                }
            },
            "rules.response.success.filters.f.json.properties.p: invalid CEL expression",
        ),
        (
            {
                "response": {
                    "success": {
                        "filters": {"f": {"json": {"properties": {"p": {"selector": "[a,b]"}}}}}
                    }
                }
            },
            "multipaths",
        ),
    ],
)
def test_unsupported_or_malformed_rules_are_config_errors(
    rules: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(AuthConfigError) as info:
        compile_auth("ns/p", rules, None, SECRETS, SYSTEM_NS)
    assert str(info.value).startswith("ns/p: ")
    assert fragment in str(info.value)


# --- selectors ---------------------------------------------------------------------------------

DOC = {
    "name": {"first": "Tom", "last": "Anderson"},
    "age": 37,
    "children": ["Sara", "Alex", "Jack"],
    "fav.movie": "Deer Hunter",
    "friends": [
        {"first": "Dale", "last": "Murphy", "age": 44, "nets": ["ig", "fb", "tw"]},
        {"first": "Roger", "last": "Craig", "age": 68, "nets": ["fb", "tw"]},
        {"first": "Jane", "last": "Murphy", "age": 47, "nets": ["ig", "tw"]},
    ],
    "auth": {
        "identity": {
            "email": "john@test",
            "sa": {"name": "my:ns:sa", "long-name": "SA in the NS namespace"},
            "encoded": "am9obg",
            "dirty": "\n\nbob\u0012",
            "github.com": "https://github.com/john",
            "basic": "Basic amFuZTpzZWNyZXQ=",
        }
    },
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("name.last", "Anderson"),
        ("children.1", "Alex"),
        ("friends.1.first", "Roger"),
        ("child*.2", "Jack"),
        ("c?ildren.0", "Sara"),
        (r"fav\.movie", "Deer Hunter"),
        ("friends.#", 3),
        ("friends.#.age", [44, 68, 47]),
        ('friends.#(last=="Murphy").first', "Dale"),
        ('friends.#(last=="Murphy")#.first', ["Dale", "Jane"]),
        ("friends.#(age>45)#.last", ["Craig", "Murphy"]),
        ('friends.#(first%"D*").last', "Murphy"),
        ('friends.#(nets.#(=="fb"))#.first', ["Dale", "Roger"]),
        ('friends.#(last="Murphy")#|#', 2),
        ("children|@reverse|0", "Jack"),
        ("auth.identity.sa.long-name.@extract", "SA"),
        ('auth.identity.sa.name.@extract:{"sep":":","pos":1}', "ns"),
        ('auth.identity.sa.name.@extract:{"sep":":","pos":9}', None),
        ("auth.identity.email.@case:upper", "JOHN@TEST"),
        ('auth.identity.email.@replace:{"old":"john","new":"jane"}', "jane@test"),
        ("auth.identity.encoded.@base64:decode", "john"),
        ("auth.identity.email.@base64:encode", "am9obkB0ZXN0"),
        ("auth.identity.dirty.@strip", "bob"),
        (r'auth.identity.github\.com|@extract:{"sep":"/","pos":3}|@case:upper', "JOHN"),
        (
            'auth.identity.basic.@extract:{"pos":1}|@base64:decode|@extract:{"sep":":","pos":0}',
            "jane",
        ),
        ("nope.x", MISSING),
        ("children.7", MISSING),
    ],
)
def test_selector_syntax(path: str, expected: Any) -> None:
    got = compile_selector(path).get(DOC)
    assert got == expected
    assert (got is MISSING) == (expected is MISSING)


def test_selector_rejects_unsupported_syntax() -> None:
    for path in ("", "a.", "[a,b]", "{a,b}", "!true", "a.@dig:x"):
        with pytest.raises(SelectorError):
            compile_selector(path)


def test_rego_reading_the_whole_input_sees_everything() -> None:
    rego = 'doc := input\nallow { doc.request.method == "GET"; doc.auth.identity.anonymous }'
    eng = engine({"authorization": {"r": {"opa": {"rego": rego}}}})
    assert eng.evaluate(request(method="GET")).allowed
    assert eng.evaluate(request(method="POST")).status == 403


def test_template_escapes_and_modifier_arguments() -> None:
    props = {
        "literal": {"selector": r"not a \{placeholder\}, {request.method}!"},
        "domain": {"selector": 'at {request.headers.x-email.@extract:{"sep":"@","pos":1}}'},
        "plain-path": {"selector": 'request.headers.x-email.@extract:{"sep":"@","pos":0}'},
    }
    rules = {"response": {"success": {"filters": {"f": {"json": {"properties": props}}}}}}
    d = engine(rules).evaluate(request({"x-email": "jane@example.com"}))
    assert d.auth == {
        "f": {
            "literal": "not a {placeholder}, POST!",
            "domain": "at example.com",
            "plain-path": "jane",
        }
    }


def test_pure_rego_decisions_are_kept_per_input_impure_ones_never() -> None:
    from tokengateway.auth.rego import RegoPolicy

    pure = RegoPolicy('allow { input.auth.identity.group == "gold" }', policy="p", rule="r")
    gold = {"auth": {"identity": {"group": "gold"}}, "request": {"id": "1"}}
    free = {"auth": {"identity": {"group": "free"}}, "request": {"id": "2"}}
    assert pure.evaluate(gold)[0] is True
    assert pure.evaluate(free)[0] is False
    # the policy reads only `auth`: requests differing elsewhere share one decision
    assert pure.evaluate({**gold, "request": {"id": "3"}})[0] is True
    assert len(pure._decisions or {}) == 2
    timed = RegoPolicy("allow { time.now_ns() > 0 }", policy="p", rule="r")
    assert timed.evaluate(gold)[0] is True
    assert timed._decisions is None


# --- decisions kept per API key ------------------------------------------------------------------


def test_a_decision_that_depends_on_the_key_alone_is_kept_per_key() -> None:
    eng = compile_auth(POLICY, TUTORIAL_RULES, None, SECRETS, SYSTEM_NS)
    gold = request({"authorization": "APIKEY iamagolduser"})
    assert eng.known(gold.headers, gold.path) is None  # nothing kept yet
    first = eng.evaluate(gold)
    assert eng.known(gold.headers, "/v1/models") is first
    assert eng.known({"authorization": "APIKEY nope"}, gold.path) is None
    assert eng.evaluate(request({"authorization": "APIKEY iamagolduser"}, path="/x")) is first
    silver = eng.evaluate(request({"authorization": "APIKEY iamasilveruser"}))
    assert (
        silver.status == 403
        and eng.evaluate(request({"authorization": "APIKEY iamasilveruser"})) is silver
    )
    for _ in range(3):  # an unknown key is never kept: each is a new 401
        wrong = eng.evaluate(request({"authorization": "APIKEY nope"}))
        assert wrong.status == 401
    assert eng._kept is not None and len(eng._kept) == 2
    assert not any(b"iamagolduser" in key for key in eng._kept)  # digests, not keys


@pytest.mark.parametrize(
    "rules",
    [
        # a filter that reads the request
        {
            "authentication": {"k": apikey(authorizationHeader={"prefix": "APIKEY"})},
            "response": {"success": {"filters": {"p": {"plain": {"selector": "request.path"}}}}},
        },
        # a CEL condition on the request
        {
            "authentication": {"k": apikey(authorizationHeader={"prefix": "APIKEY"})},
            "authorization": {
                "only-chat": {
                    "patternMatching": {
                        "patterns": [{"predicate": 'request.path.startsWith("/v1/chat")'}]
                    }
                }
            },
        },
        # a Rego policy that reads the clock
        {
            "authentication": {"k": apikey(authorizationHeader={"prefix": "APIKEY"})},
            "authorization": {
                "clock": {"opa": {"rego": "allow { time.now_ns() > 0 }"}},
            },
        },
        # a Rego policy that reads the request
        {
            "authentication": {"k": apikey(authorizationHeader={"prefix": "APIKEY"})},
            "authorization": {
                "path": {"opa": {"rego": 'allow { input.request.path == "/v1/chat/completions" }'}},
            },
        },
    ],
    ids=["filter-reads-request", "cel-reads-request", "rego-clock", "rego-reads-request"],
)
def test_a_decision_that_reads_more_than_the_key_is_never_kept(rules: dict[str, Any]) -> None:
    eng = engine(rules)
    assert eng._kept is None
    gold = {"authorization": "APIKEY iamagolduser"}
    first = eng.evaluate(request(gold))
    assert first.allowed
    other = eng.evaluate(request(gold, path="/v1/other"))
    assert other is not first
    if "filter" in str(rules):
        assert other.auth == {"p": "/v1/other"} and first.auth == {"p": "/v1/chat/completions"}
    if "only-chat" in str(rules) or "path" in rules.get("authorization", {}):
        assert not other.allowed


def test_a_kept_decision_is_found_by_a_key_in_the_query_too() -> None:
    rules = {"authentication": {"k": apikey(queryString={"name": "api_key"})}}
    eng = engine(rules)
    first = eng.evaluate(request(path="/v1/chat/completions?api_key=iamagolduser"))
    assert first.allowed
    assert eng.known({}, "/v1/models?api_key=iamagolduser") is first
    assert eng.known({}, "/v1/models") is None


@pytest.mark.parametrize("first", ["tokengateway.auth.rego", "tokengateway.auth"])
def test_cel_survives_any_import_order_of_our_modules(first: str) -> None:
    """regopy loaded before cel-expr-python makes a failing CEL evaluation abort the process
    (see auth/rego.py): a fresh process that imports `first` before the CEL module must still
    evaluate one."""
    script = (
        f"import {first}\n"
        "from tokengateway.expr import cel\n"
        "act = cel.Activation({'request': {'method': 'GET'}})\n"
        "print(cel.compile_predicate('request.nope == 1').test(act),\n"
        "      cel.compile_predicate(\"request.method == 'GET'\").test(act))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert (done.returncode, done.stdout) == (0, "False True\n"), done.stderr
