"""Tests for the per-op profile of a compiled step (benchmarks/profile.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks import profile
from train.steps import CPU_COMPILER_OPTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A hand-written module in the form `compiled.as_text()` prints (names with and
# without '%', nested fusions, a GPU-style library call, a scan's while loop).
HLO = '''HloModule jit_train_step, is_scheduled=true

%inner_dot (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %dot.1 = f32[4,2]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%outer_fusion (p0: f32[4,8], p1: f32[8,2]) -> f32[4,2] {
  %p0 = f32[4,8]{1,0} parameter(0)
  %p1 = f32[8,2]{1,0} parameter(1)
  ROOT %call_dot = f32[4,2]{1,0} fusion(%p0, %p1), kind=kOutput, calls=%inner_dot
}

%adds (p0: f32[4,2]) -> f32[4,2] {
  %p0 = f32[4,2]{1,0} parameter(0)
  ROOT %add.3 = f32[4,2]{1,0} add(%p0, %p0)
}

body (p: (s32[], f32[4,2])) -> (s32[], f32[4,2]) {
  p = (s32[], f32[4,2]{1,0}) parameter(0)
  x = f32[4,2]{1,0} get-tuple-element(p), index=1
  add_fusion.2 = f32[4,2]{1,0} fusion(x), kind=kLoop, calls=%adds, metadata={op_name="jit(train_step)/jvp(Transformer)/layers/mlp/add"}
  i = s32[] get-tuple-element(p), index=0
  ROOT t = (s32[], f32[4,2]{1,0}) tuple(i, add_fusion.2)
}

cond (p: (s32[], f32[4,2])) -> pred[] {
  p = (s32[], f32[4,2]{1,0}) parameter(0)
  ROOT c = pred[] constant(true)
}

ENTRY %main.9 (a: f32[4,8], b: f32[8,2]) -> f32[4,2] {
  %a = f32[4,8]{1,0} parameter(0)
  %b = f32[8,2]{1,0} parameter(1)
  %mm_fusion = f32[4,2]{1,0} fusion(%a, %b), kind=kOutput, calls=%outer_fusion, metadata={op_name="jit(train_step)/jvp(Transformer)/layers_0/mlp/dot_general"}
  %gemm.4 = (f32[4,2]{1,0}, s8[16]{0}) custom-call(%a, %b), custom_call_target="__cublas$gemm"
  %fmha.5 = (bf16[1,4,2,8]{3,2,1,0}, u8[0]{0}) custom-call(%a, %b), custom_call_target="__cudnn$fmhaSoftmaxBackward"
  %all-reduce.6 = f32[4,2]{1,0} all-reduce(%mm_fusion), replica_groups={}, to_apply=%adds
  %tr = f32[2,4]{0,1} transpose(%all-reduce.6), dimensions={1,0}
  %w = (s32[], f32[4,2]{1,0}) while((s32[], f32[4,2]{1,0}) %t0), condition=cond, body=body
  ROOT %r = f32[4,2]{1,0} reduce(%mm_fusion, %c), dimensions={0}, to_apply=%adds
}
'''


def test_hlo_ops_are_put_in_their_categories():
  ops = profile.hlo_ops(HLO)
  expected = {
      'mm_fusion': 'matmul',     # a fusion whose fused computation calls one holding a dot
      'call_dot': 'matmul', 'dot.1': 'matmul',
      'gemm.4': 'matmul', 'fmha.5': 'attention',
      'all-reduce.6': 'collective', 'tr': 'copy', 'w': 'control',
      'add_fusion.2': 'fusion',  # inside the while body; only adds
      'add.3': 'other', 'r': 'other',
  }
  assert {name: ops[name]['category'] for name in expected} == expected
  assert ops['mm_fusion']['source'] == 'layers_0/mlp/dot_general'


def test_summary_divides_by_steps_and_leaves_loops_out():
  ops = profile.hlo_ops(HLO)
  events = [('mm_fusion', 0.3), ('mm_fusion', 0.1), ('fmha.5', 0.2), ('add_fusion.2', 0.1),
            ('add_fusion.2', 0.1), ('w', 5.0), ('tr', 0.2), ('not_in_the_module', 0.2)]
  summary = profile.summarize(events, ops, steps=2, top=3)
  assert summary['op_seconds_per_step'] == pytest.approx(0.6)   # (1.2 without the loop) / 2
  shares = {c: v['share'] for c, v in summary['by_category'].items()}
  seconds = {c: v['seconds_per_step'] for c, v in summary['by_category'].items()}
  assert seconds == pytest.approx({'matmul': 0.2, 'attention': 0.1, 'fusion': 0.1, 'copy': 0.1,
                                   'other': 0.1})
  assert sum(shares.values()) == pytest.approx(1.0)
  assert [op['op'] for op in summary['top_ops']][0] == 'mm_fusion'
  assert summary['top_ops'][0]['calls_per_step'] == 1.0
  assert 'w' not in [op['op'] for op in summary['top_ops']]


def test_a_real_step_profile_accounts_for_its_ops():
  # A subprocess, as users run it (the benchmark's absl flags stay out of this process).
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.train_step',
       '--config=configs/pretrain.py:tiny,model.num_layers=1,batch_size=2,seq_len=64,'
       'model.max_len=64', '--steps=1', '--warmup=0', '--profile_steps=2'],
      cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads(result.stdout.strip().splitlines()[-1])
  summary = report['profile']
  assert summary['steps'] == 2
  assert report['compiler_options'] == CPU_COMPILER_OPTIONS  # what the step was compiled with
  total = sum(v['seconds_per_step'] for v in summary['by_category'].values())
  assert total == pytest.approx(summary['op_seconds_per_step'])
  assert 0 < summary['op_seconds_per_step'] < 10 * report['step_time_s']
  # The ops the trace names are the compiled module's, and the matmuls are found.
  assert all(op['opcode'] != '?' for op in summary['top_ops'])
  assert summary['by_category']['matmul']['share'] > 0.2
  assert any(op['source'].endswith('dot_general') for op in summary['top_ops'])


def test_benchmark_batch_packs_equal_documents_per_row():
  # benchmarks.train_step defines absl flags on import: read its helper in a subprocess.
  code = ('import ml_collections; from benchmarks import train_step; '
          'c = ml_collections.ConfigDict(dict(batch_size=2, seq_len=10, '
          'model=dict(vocab_size=50))); b = train_step.random_batch(c, documents=3); '
          'print(b["segment_ids"].tolist(), b["positions"].tolist(), b["tokens"].shape)')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  segments, positions = [1, 1, 1, 1, 2, 2, 2, 3, 3, 3], [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
  assert result.stdout.strip() == f'{[segments] * 2} {[positions] * 2} (2, 10)'
