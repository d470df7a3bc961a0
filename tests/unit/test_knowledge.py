"""The knowledge graph: the ImageNet classes in WordNet, roll-ups up the hierarchy, facts, concepts in text."""

import numpy as np
import pytest
from torchvision.models import MobileNet_V2_Weights

from knowledge.graph import ROOT, KnowledgeGraph, UnknownConcept, _word, knowledge_graph

CATEGORIES = MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"]  # the served model's class names, in order


@pytest.fixture(scope="module")
def graph() -> KnowledgeGraph:
    return knowledge_graph()


def one_hot(index: int) -> np.ndarray:
    probs = np.zeros(1000, np.float32)
    probs[index] = 1.0
    return probs


def test_every_class_of_the_vision_model_is_a_synset_of_the_graph_in_the_same_order(graph):
    assert len(graph.classes) == len(CATEGORIES) == 1000 == len(set(graph.classes))
    for index, category in enumerate(CATEGORIES):
        lemmas = {_word(lemma) for lemma in graph.class_synset(index).lemmas}
        # torchvision renamed its two duplicate names ("crane bird", "maillot tank suit"): their first word counts
        assert _word(category) in lemmas or _word(category.split()[0]) in lemmas, (index, category, lemmas)


def test_the_graph_is_the_classes_and_their_ancestors_up_to_entity(graph):
    assert len(graph.synsets) == 1860
    for key, synset in graph.synsets.items():
        assert ROOT in graph.ancestors(key), synset.name  # every synset reaches the root: no orphan, no cycle
        assert synset.definition and synset.lemmas
    assert {key for c in graph.classes for key in graph.ancestors(c)} == set(graph.synsets)
    counts = {name: len(graph.classes_below(graph.resolve(name).id)) for name in ("animal", "dog", "vehicle", "entity")}
    assert counts == {"animal": 398, "dog": 118, "vehicle": 67, "entity": 1000}


def test_concepts_are_named_by_word_synset_name_or_id(graph):
    dog = graph.resolve("dog")
    assert dog.name == "dog.n.01" and dog.id == "n02084071"
    assert graph.resolve("Dog.N.01") == graph.resolve("n02084071") == graph.resolve(" DOG ") == dog
    assert graph.resolve("domestic dog") == graph.resolve("domestic_dog") == dog
    assert graph.resolve("hot-dog").name == "hotdog.n.02"
    assert graph.resolve("crane").name == "crane.n.04"  # the machine: WordNet's more frequent sense
    assert graph.resolve("crane.n.05").definition.startswith("large long-necked wading bird")


@pytest.mark.parametrize(
    ("concept", "suggested"), [("vehical", "vehicle"), ("dgo", "dog"), ("animl", "animal"), ("bevrage", "beverage")]
)
def test_an_unknown_concept_suggests_close_words(graph, concept, suggested):
    with pytest.raises(UnknownConcept) as raised:
        graph.resolve(concept)
    assert suggested in raised.value.suggestions
    assert concept not in str(raised.value)  # the caller's text is not echoed


def test_nothing_close_suggests_nothing(graph):
    with pytest.raises(UnknownConcept) as raised:
        graph.resolve("qqqqqqqqqqqq")
    assert raised.value.suggestions == [] and "close matches" not in str(raised.value)


def test_rollups_sum_the_classes_below_each_class_once(graph):
    probs = np.random.default_rng(0).dirichlet(np.ones(1000)).astype(np.float32)
    assert graph.rollup(probs, ROOT) == pytest.approx(1.0, abs=1e-6)
    tabby = CATEGORIES.index("tabby")
    for concept in ("tabby", "cat", "feline", "carnivore", "mammal", "animal", "entity"):
        assert graph.rollup(one_hot(tabby), graph.resolve(concept).id) == 1.0, concept
    for concept in ("dog", "vehicle", "food", "plant"):
        assert graph.rollup(one_hot(tabby), graph.resolve(concept).id) == 0.0, concept
    dogs = graph.classes_below(graph.resolve("dog").id)
    assert graph.rollup(probs, graph.resolve("dog").id) == pytest.approx(float(probs[dogs].sum()), rel=1e-6)
    with pytest.raises(ValueError, match="1000 ImageNet class probabilities"):
        graph.rollup(np.ones(10, np.float32) / 10, ROOT)


def test_a_class_reachable_by_two_paths_counts_once(graph):
    shared = [i for i, key in enumerate(graph.classes) if len(graph.synsets[key].hypernyms) > 1]
    assert shared, "WordNet has classes with two parents"
    index = shared[0]
    assert graph.rollup(one_hot(index), ROOT) == 1.0


def test_facts_give_the_definition_and_what_it_is_a_kind_of(graph):
    fact = graph.fact(graph.resolve("tabby").id)
    assert fact.kind_of[:2] == ("domestic cat", "cat")
    text = fact.render()
    assert text.startswith("tabby, tabby cat: a cat with a grey or tawny coat mottled with black.")
    assert "It is a kind of domestic cat, cat" in text


def test_concepts_named_in_a_question_are_found_in_order(graph):
    found = graph.mentioned("Can the tabby cat reach the espresso machine? Are hot dogs food for a dog?", limit=10)
    names = [s.name for s in found]
    assert names == ["tabby.n.01", "espresso.n.01", "machine.n.01", "hotdog.n.02", "food.n.01", "dog.n.01"]
    assert "can.n.01" not in names  # "Can" is a verb here
    assert graph.mentioned("What is the meaning of life?", limit=5) == []
    assert len(graph.mentioned("dog cat pizza espresso tabby", limit=2)) == 2
