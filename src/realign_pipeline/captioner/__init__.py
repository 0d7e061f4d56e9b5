from .base import LLM, Detection, Grounder, LLMResult, ObjectJudgement, Tagger
