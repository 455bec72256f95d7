"""train.evaluate: bits per byte over a whole split equals a hand computation."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from data_pipeline import shards
from data_pipeline.tokenizer import BOS_ID, EOS_ID
from model.config import ModelConfig
from model.transformer import Transformer
from train import evaluate
from train import mesh as mesh_lib

SEQ_LEN = 16
# (tokens, UTF-8 bytes) per document; lengths chosen so rows pack several
# documents and the last batch is partly padding. All fit in SEQ_LEN with BOS/EOS.
DOCS = [([5, 6, 7, 8, 9], 17), ([10, 11], 6), ([12, 13, 14, 15, 16, 17, 18, 19, 20, 21], 40),
        ([22], 3), ([23, 24, 25, 26, 27, 28, 29], 25), ([30, 31, 32], 9),
        ([33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46], 50)]
LONG_DOC = (list(range(5, 45)), 120)  # 42 tokens with BOS/EOS: cut into 3 pieces of <= 16


def _config():
  config = pretrain.get_config(
      f'tiny,seq_len={SEQ_LEN},batch_size=2,model.vocab_size=64,model.d_model=32,'
      'model.num_layers=2,model.num_heads=4,model.num_kv_heads=2,model.head_dim=8,'
      f'model.mlp_dim=64,model.max_len={SEQ_LEN}')
  return config


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp('data'))
  records = lambda docs: [(f'doc{i}', toks, nbytes) for i, (toks, nbytes) in enumerate(docs)]
  shards.write_dataset(data_dir, {'test': records(DOCS), 'validation': records(DOCS + [LONG_DOC])})
  config = _config()
  model = Transformer(ModelConfig.from_config(config.model))
  init = jax.jit(model.init)
  params = nn.unbox(init(jax.random.key(0), jnp.zeros((1, SEQ_LEN), jnp.int32))['params'])
  mesh = mesh_lib.make_mesh(config.mesh)
  return data_dir, config, model, params, mesh


def _hand_nats(model, params, docs):
  """Sum over documents of -log p(token | document prefix), for tokens + EOS."""
  total = 0.0
  forward = jax.jit(model.apply)
  for tokens, _ in docs:
    seq = np.array([BOS_ID] + tokens + [EOS_ID], np.int32)
    # Zeros after the document change nothing before them (causal); one shape, one compile.
    padded = np.zeros((1, SEQ_LEN), np.int32)
    padded[0, :len(seq)] = seq
    logp = np.asarray(jax.nn.log_softmax(forward({'params': params}, padded)[0]), np.float64)
    total -= sum(logp[t, seq[t + 1]] for t in range(len(seq) - 1))
  return total


def test_bits_per_byte_matches_hand_computation(setup):
  data_dir, config, model, params, mesh = setup
  result = evaluate.evaluate_split(config, model, params, mesh, data_dir=data_dir, split='test',
                                   progress=False)
  nats = _hand_nats(model, params, DOCS)
  num_bytes = sum(b for _, b in DOCS)
  num_tokens = sum(len(t) + 1 for t, _ in DOCS)
  assert result['num_tokens'] == num_tokens and result['unpredicted_tokens'] == 0
  assert result['num_bytes'] == num_bytes and result['num_documents'] == len(DOCS)
  np.testing.assert_allclose(result['nats'], nats, rtol=1e-5)
  np.testing.assert_allclose(result['bits_per_byte'], nats / num_bytes / math.log(2), rtol=1e-5)
  np.testing.assert_allclose(result['loss'], nats / num_tokens, rtol=1e-5)
  np.testing.assert_allclose(result['perplexity'], math.exp(nats / num_tokens), rtol=1e-5)
  assert result['bits_per_byte_extrapolated'] == pytest.approx(result['bits_per_byte'])


def test_cut_documents_are_counted_as_unpredicted(setup):
  data_dir, config, model, params, mesh = setup
  result = evaluate.evaluate_split(config, model, params, mesh, data_dir=data_dir,
                                   split='validation', progress=False)
  # The long document is cut into 3 pieces: the first token of pieces 2 and 3 has no target.
  expected = sum(len(t) + 1 for t, _ in DOCS + [LONG_DOC])
  assert result['unpredicted_tokens'] == 2
  assert result['num_tokens'] == expected - 2
  assert result['bits_per_byte_extrapolated'] > result['bits_per_byte']


def test_unigram_baseline_matches_hand_computation(tmp_path):
  data_dir = str(tmp_path)
  train_docs = [[5, 5, 6], [6, 7], [5]]
  test_docs = [[5, 7], [8]]
  shards.write_dataset(data_dir, {
      'train': [(f't{i}', d, 4) for i, d in enumerate(train_docs)],
      'test': [(f's{i}', d, 4) for i, d in enumerate(test_docs)]})
  vocab = 10
  counts = np.zeros(vocab)
  for doc in train_docs:
    for token in doc + [EOS_ID]:
      counts[token] += 1
  probs = (counts + 1) / (counts.sum() + vocab)
  targets = [t for doc in test_docs for t in doc + [EOS_ID]]
  expected = -np.mean([math.log(probs[t]) for t in targets])
  assert evaluate.unigram_baseline(data_dir, 'test', vocab) == pytest.approx(expected, rel=1e-12)
  # Without a train split there is no baseline, rather than a wrong one.
  other = str(tmp_path / 'no_train')
  shards.write_dataset(other, {'test': [('s0', [5], 4)]})
  assert evaluate.unigram_baseline(other, 'test', vocab) is None


def test_name_token_loss_reads_the_requested_name_in_the_reference_answer(stdlib_tokenizer):
  """The tokens it scores spell the name; their loss is the model's at those positions."""
  from data_pipeline import chat  # pylint: disable=g-import-not-at-top
  tok = stdlib_tokenizer
  prompts = [
      {'messages': [{'role': 'user', 'content': 'Implement `def iter_fields(node)`.'}],
       'answer': 'def iter_fields(node):\n    """Yield fields."""\n    return node._fields',
       'function_name': 'iter_fields'},
      {'messages': [{'role': 'user', 'content': 'Implement the method `def tell(self)`.'}],
       'answer': '@property\ndef tell(self):\n    return self._pos',
       'function_name': 'Reader.tell'},
  ]
  for p in prompts:
    ids = chat.encode_text(tok, p['answer'])
    name = p['function_name'].split('.')[-1]
    positions = evaluate._name_positions(tok, ids, name, p['answer'])
    assert positions == list(range(positions[0], positions[-1] + 1))
    assert name in tok.decode([ids[j] for j in positions])
    assert name not in tok.decode([ids[j] for j in positions[1:]])     # no token too many
    assert name not in tok.decode([ids[j] for j in positions[:-1]])
  config = pretrain.get_config(
      f'tiny,model.vocab_size={tok.vocab_size},model.d_model=32,model.num_layers=2,'
      'model.num_heads=4,model.num_kv_heads=2,model.head_dim=8,model.mlp_dim=64,model.max_len=64')
  model = Transformer(ModelConfig.from_config(config.model))
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))['params'])
  mesh = mesh_lib.make_mesh(config.mesh)
  result = evaluate.name_token_loss(config, model, params, tok, mesh, prompts, batch_size=4)
  name_nll, other_nll = [], []
  for p in prompts:   # by hand, one conversation at a time
    prompt_ids = list(chat.render_prompt(tok, p['messages']))
    answer_ids = chat.encode_text(tok, p['answer'])
    seq = np.array(prompt_ids + answer_ids, np.int32)
    logp = np.asarray(jax.nn.log_softmax(model.apply({'params': params}, seq[None])[0]))
    named = evaluate._name_positions(tok, answer_ids, p['function_name'].split('.')[-1],
                                     p['answer'])
    for j in range(len(answer_ids)):
      nll = -logp[len(prompt_ids) + j - 1, answer_ids[j]]
      (name_nll if j in named else other_nll).append(nll)
  assert result['name_tokens'] == len(name_nll)
  np.testing.assert_allclose(result['name_token_loss'], np.mean(name_nll), rtol=1e-4)
  np.testing.assert_allclose(result['other_answer_token_loss'], np.mean(other_nll), rtol=1e-4)


class _Copier(nn.Module):
  """An oracle that predicts token t + 1 as the token `period` places before it."""
  config: ModelConfig
  period: int

  @nn.compact
  def __call__(self, tokens):
    length = tokens.shape[1]
    source = jnp.arange(length) + 1 - self.period
    guess = jnp.where(source >= 0, tokens[:, jnp.clip(source, 0, length - 1)], 0)
    return 30.0 * jax.nn.one_hot(guess, self.config.vocab_size)


def test_copy_probe_scores_the_first_occurrence_and_the_repeat(stdlib_tokenizer):
  """A perfect copier is near 0 on the repeat and far above on the first occurrence."""
  tok = stdlib_tokenizer
  config = pretrain.get_config(f'tiny,model.vocab_size={tok.vocab_size},model.max_len=64')
  mesh = mesh_lib.make_mesh(config.mesh)
  cfg = ModelConfig.from_config(config.model)
  copier = evaluate.copy_probe(config, _Copier(cfg, period=31), {}, tok, mesh, length=40)
  assert copier['copy_length'] == 31  # (max_len - 1) // 2: BOS + 31 + 31 fit in 64
  assert copier['copy_repeat_loss'] < 1e-6
  assert copier['copy_first_loss'] > 20.0
  off_by_one = evaluate.copy_probe(config, _Copier(cfg, period=30), {}, tok, mesh, length=40)
  assert off_by_one['copy_repeat_loss'] > 20.0
