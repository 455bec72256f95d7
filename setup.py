"""strata: train language models end to end on JAX."""

from setuptools import setup

setup(
    name='strata',
    version='0.1.0',
    description='Train language models end to end on JAX: data, tokenizer, pre-training, '
                'evaluation, fine-tuning, reward models and policy optimisation.',
    python_requires='>=3.11',
    packages=['configs', 'data_pipeline', 'model', 'train', 'launch', 'benchmarks'],
    package_data={'launch': ['*.sh', '*.ipynb']},
    install_requires=[
        'jax>=0.6,<0.11',
        'flax>=0.10,<0.13',
        'optax>=0.2.4,<0.3',
        'orbax-checkpoint>=0.11,<0.13',
        'tensorflow-datasets>=4.9.7,<4.10',
        'grain>=0.2.10,<0.3',
        'array-record>=0.7,<0.9',
        'sentencepiece>=0.2,<0.3',
        'ml-collections>=1.0,<2',
        'absl-py>=2.1',
        'numpy>=1.26',
        'pyarrow>=15',
        'tqdm>=4.66',
        'matplotlib>=3.8',
        'tensorboardX>=2.6',
        'safetensors>=0.4',
        'scipy>=1.11',
    ],
    extras_require={
        'test': ['pytest>=8', 'nbclient>=0.10', 'nbformat>=5.10', 'ipykernel>=6.29'],
        # gcsfs: etils.epath reads and writes gs:// workdirs through it (no TensorFlow);
        # google-cloud-storage: Orbax's CheckpointManager queries the bucket on gs://,
        # and tensorboardX writes gs:// event files with it.
        'tpu': ['jax[tpu]>=0.6,<0.11', 'gcsfs>=2024.2', 'google-cloud-storage>=2.14'],
        'gpu': ['jax[cuda12]>=0.6,<0.11'],
    },
)
