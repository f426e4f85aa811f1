"""Models for HERON-SFL experiments, each split declaratively into client, auxiliary head and server."""

from heron.models.bert import BertConfig, bert_split, minilm_split
from heron.models.cnn import cnn_split
from heron.models.gpt2 import GPT2Config, gpt2_split
from heron.models.resnet import resnet18_split
from heron.models.split import SplitModel

__all__ = ["BertConfig", "GPT2Config", "SplitModel", "bert_split", "cnn_split", "gpt2_split", "minilm_split",
           "resnet18_split"]
