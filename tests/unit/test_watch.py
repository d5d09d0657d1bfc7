from pipeline.devtools.watch import describe
from pipeline.model_spec import OutputSpec


def test_class_probabilities_read_as_the_top_label_and_its_probability():
    specs = {"probs": OutputSpec("probs", (3,), "class probabilities", ("cat", "dog", "eel"))}
    assert describe({"probs": [0.1, 0.7, 0.2]}, specs) == "probs: 'dog' p=0.700"


def test_without_labels_the_class_index_is_shown():
    assert describe({"probs": [0.6, 0.4]}, {}) == "probs: '0' p=0.600"


def test_a_forecast_shows_its_first_values():
    shown = describe({"y": [1.0, 2.5, 3.25, 4.0, 5.0]}, {})
    assert shown == "y: [1, 2.5, 3.25, 4, ...]"
