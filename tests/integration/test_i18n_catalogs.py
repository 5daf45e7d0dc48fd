"""The web application's message catalogs (gateway/www/i18n/<lang>.json) are complete: every
language has exactly the keys of en.json, no value is empty, the {placeholders} agree, and
every key the application uses (t('key') and other key literals in the JS modules, data-i18n
attributes in the HTML, and the keys built from a prefix plus a known value) is in en.json.
No processes are started."""
import glob
import json
import os
import re

import pytest

WWW = os.path.join(os.path.dirname(__file__), "..", "..", "gateway", "www")
LANGS = ("en", "ru", "es", "fr", "de")
NAMESPACES = ("app", "nav", "worklist", "report", "section", "status", "admin", "audit",
              "routes", "system", "account", "error", "language", "user_state", "login")
# keys made at run time from a prefix and one of these values
DYNAMIC = {
    "status.": ("none", "draft", "final", "amended"),
    "section.": ("clinical_information", "technique", "findings", "impression",
                 "recommendations"),
    "language.": LANGS,
    "user_state.": ("active", "disabled", "locked", "must_change_password"),
    "admin.tab_": ("users", "roles", "sites", "modalities", "templates", "routes", "audit",
                   "system"),
    "audit.outcome_": ("success", "failure"),
    "audit.": ("user", "action", "patient", "study", "from", "to"),
    "routes.state_": ("pending", "sending", "delivered", "dead"),
    "routes.trigger_": ("instance", "study"),
}


def load(lang):
    with open(os.path.join(WWW, "i18n", lang + ".json"), encoding="utf-8") as f:
        return json.load(f)


def permissions():
    sql = open(os.path.join(WWW, "..", "..", "schema", "0003_auth.sql")).read()
    return set(re.findall(r"\('([a-z]+\.[a-z_]+)',\s+'", sql))


def used_keys():
    """Key literals of the JS modules and data-i18n attributes of the HTML pages."""
    ns = "|".join(NAMESPACES)
    lit = re.compile(r"""['"]((?:%s)\.[a-z0-9_]+)['"]""" % ns)
    selector = re.compile(r"""\bh\(\s*['"]([^'"]+)['"]""")  # h('section.card', ...): a tag
    keys = {}
    for path in glob.glob(os.path.join(WWW, "*.js")):
        text = open(path, encoding="utf-8").read()
        tags = set(selector.findall(text))
        for k in lit.findall(text):
            if k not in tags:
                keys.setdefault(k, os.path.basename(path))
    for path in glob.glob(os.path.join(WWW, "*.html")):
        text = open(path, encoding="utf-8").read()
        for k in re.findall(r'data-i18n(?:-[a-z]+)?="([^"]+)"', text):
            keys.setdefault(k, os.path.basename(path))
    perms = permissions()
    return {k: f for k, f in keys.items() if k not in perms and not k.endswith(("_", "."))}


def test_every_language_has_every_key():
    en = load("en")
    assert len(en) > 150
    for lang in LANGS[1:]:
        other = load(lang)
        missing = sorted(set(en) - set(other))
        extra = sorted(set(other) - set(en))
        assert not missing, f"{lang}.json lacks {missing}"
        assert not extra, f"{lang}.json has keys en.json does not: {extra}"


@pytest.mark.parametrize("lang", LANGS)
def test_values_are_translated_text(lang):
    en, cat = load("en"), load(lang)
    for k, v in cat.items():
        assert isinstance(v, str) and v.strip(), f"{lang}: {k} is empty"
        assert set(re.findall(r"\{(\w+)\}", v)) == set(re.findall(r"\{(\w+)\}", en[k])), \
            f"{lang}: {k} has other placeholders than en"
    if lang != "en":
        # a real translation: most texts differ from English (names and codes may not)
        same = [k for k in en if cat[k] == en[k] and not k.startswith("language.")]
        assert len(same) < len(en) * 0.12, f"{lang}: {len(same)} texts identical to en: {same}"


def test_every_used_key_is_in_the_catalog():
    en = load("en")
    used = used_keys()
    assert len(used) > 100, "the key extraction found too little: the pattern is stale"
    missing = sorted(f"{k} ({f})" for k, f in used.items() if k not in en)
    assert not missing, f"keys used but missing from en.json: {missing}"
    for prefix, values in DYNAMIC.items():
        for v in values:
            assert prefix + v in en, f"{prefix}{v} (built at run time) missing from en.json"


def test_a_missing_key_is_detected(tmp_path, monkeypatch):
    """The check above fails when a module uses a key that no catalog has."""
    fake = tmp_path / "gateway" / "www"
    (fake / "i18n").mkdir(parents=True)
    for lang in LANGS:
        (fake / "i18n" / f"{lang}.json").write_text(json.dumps(load(lang)), encoding="utf-8")
    (fake / "x.js").write_text("t('worklist.no_such_key_here');\n")
    schema = tmp_path / "schema"
    schema.mkdir()
    (schema / "0003_auth.sql").write_text("")
    monkeypatch.setattr(__import__(__name__), "WWW", str(fake))
    with pytest.raises(AssertionError, match="worklist.no_such_key_here"):
        test_every_used_key_is_in_the_catalog()
