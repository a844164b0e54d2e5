"""The shipped DeepSpeed JSONs. setup.py installs this folder as the package ``pyramidion_ds.ds_configs``, so
``--train.deepspeed_config zero3_bf16`` finds ``zero3_bf16.json`` from any directory and in any install;
this file only makes the folder a package (an editable install cannot map a namespace subpackage)."""
