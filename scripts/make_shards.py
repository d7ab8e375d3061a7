"""Raw image data set -> WebDataset shards + meta.json (see livt_ds/data/make_shards.py); also --verify."""

from livt_ds.data.make_shards import main

raise SystemExit(main())
