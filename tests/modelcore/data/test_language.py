"""The datasheet's language guess (modelcore/data/language.py) on real and written text."""

from __future__ import annotations

import sysconfig
from pathlib import Path
from pydoc_data.topics import topics

from modelcore.data.language import guess_language, guess_languages

GERMAN = (
    "Der Hund läuft über die Straße, und die Katze schläft auf dem Sofa. Wir wissen "
    "nicht, ob es morgen regnen wird, aber wir nehmen einen Schirm mit, wenn wir zum "
    "Markt gehen."
)
FRENCH = (
    "Le chien traverse la rue et le chat dort sur le canapé. Nous ne savons pas s'il va "
    "pleuvoir demain, mais nous prenons un parapluie avec nous pour aller au marché."
)
SPANISH = (
    "El perro cruza la calle y el gato duerme en el sofá. No sabemos si va a llover "
    "mañana, pero llevamos un paraguas con nosotros cuando vamos al mercado."
)
RUSSIAN = "Собака переходит улицу, а кошка спит на диване. Мы не знаем, пойдёт ли дождь."


def test_english_prose_from_the_python_docs() -> None:
    for name in ("assert", "assignment", "exceptions", "if", "with"):
        guess = guess_language(topics[name])
        assert guess.tag == "en", (name, guess)
        assert guess.reason == "stopwords"


def test_written_sentences_in_other_languages() -> None:
    assert guess_language(GERMAN).tag == "de"
    assert guess_language(FRENCH).tag == "fr"
    assert guess_language(SPANISH).tag == "es"
    assert guess_language(RUSSIAN).tag == "ru"
    assert guess_language(RUSSIAN).reason == "script"


def test_c_code_is_no_human_language() -> None:
    include = Path(sysconfig.get_paths()["include"])
    for name in ("object.h", "longobject.h", "pymem.h"):
        guess = guess_language((include / name).read_text(encoding="utf-8"))
        # zxx: ISO 639's "no linguistic content", a valid BCP-47 tag for the datasheet.
        assert guess.tag == "zxx", (name, guess)
        assert guess.code_line_share >= 0.5


def test_too_little_or_unclear_text_is_undetermined() -> None:
    assert guess_language("hello world").tag == "und"
    lorem = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, tempor incididunt labore."
    assert guess_language(lorem).tag == "und"
    assert guess_language(lorem).reason == "no clear stopwords"
    assert guess_language("").tag == "und"


def test_a_collection_lists_its_languages_by_bytes() -> None:
    english = topics["assert"]
    mixed = [english, GERMAN * 20, FRENCH]  # French: under a fifth of the bytes
    tags = [tag for tag, _ in guess_languages(mixed)]
    assert tags == (["de", "en"] if len(GERMAN * 20) > len(english) else ["en", "de"])
    assert guess_languages(["hi"]) == [("und", 1.0)]
