"""The node's configuration: embedded defaults, a file, the environment."""

from __future__ import annotations

import pytest

from config import ConfigError, load_config


def test_defaults_have_the_documented_keys():
    c = load_config(environ={})
    assert c.node["ae_title"] == "LUNGSYS" and c.node["port"] == 11112
    assert c.node["host"] == "0.0.0.0" and c.node["data_dir"] == "var"
    assert c.node["allowed_calling_aets"] == []
    assert c.store["url"] == "sqlite:///var/lungsys.db"
    assert c.assembly == {"stable_seconds": 10, "min_slices": 20}
    assert c.model["checkpoint"] == "" and c.model["device"] == "auto"
    assert c.dicomweb["port"] == 8080                   # STOW-RS receiver on by default
    assert c.destinations == ()


def test_file_then_environment(tmp_path):
    f = tmp_path / "node.toml"
    f.write_text('[node]\nae_title = "AI1"\nport = 104\n[assembly]\nstable_seconds = 3\n'
                 '[[destinations]]\nname = "pacs"\nkind = "dimse"\nae_title = "ORTHANC"\n'
                 'host = "127.0.0.1"\nport = 4242\n'
                 '[[destinations]]\nname = "web"\nkind = "dicomweb"\n'
                 'url = "http://127.0.0.1:8042/dicom-web"\n')
    c = load_config(f, environ={"LUNGSYS_NODE_PORT": "11113",
                                "LUNGSYS_NODE_ALLOWED_CALLING_AETS": '["CT1", "PACS"]',
                                "LUNGSYS_STORE_URL": "postgresql+psycopg://db/lungsys",
                                "LUNGSYS_DICOMWEB_PORT": "0"})
    assert c.node["ae_title"] == "AI1" and c.node["port"] == 11113
    assert c.node["allowed_calling_aets"] == ["CT1", "PACS"]
    assert c.assembly["stable_seconds"] == 3
    assert c.dicomweb["port"] == 0
    assert c.store["url"].startswith("postgresql")
    assert [(d.name, d.kind, d.port, d.url) for d in c.destinations] == [
        ("pacs", "dimse", 4242, ""), ("web", "dicomweb", 0, "http://127.0.0.1:8042/dicom-web")]


@pytest.mark.parametrize("text, words", [
    ("[node]\nport = 'eleven'\n", "node.port: expected an integer"),
    ("[node]\nportt = 1\n", "node.portt: unknown key"),
    ("[nodes]\nport = 1\n", "unknown section [nodes]"),
    ("[node]\nae_title = 'A_VERY_LONG_AE_TITLE'\n", "node.ae_title"),
    ("[[destinations]]\nkind = 'ftp'\n", "destinations[0].kind"),
    ("[[destinations]]\nkind = 'dimse'\nhost = '127.0.0.1'\n", "destinations[0].ae_title"),
    ("[node\n", "not valid TOML"),
])
def test_bad_configuration_names_the_key(tmp_path, text, words):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(f, environ={})
    assert words in str(err.value)


def test_bad_environment_value():
    with pytest.raises(ConfigError, match="LUNGSYS_ASSEMBLY_MIN_SLICES"):
        load_config(environ={"LUNGSYS_ASSEMBLY_MIN_SLICES": "many"})
