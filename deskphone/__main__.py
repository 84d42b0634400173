"""`python -m deskphone --listen 127.0.0.1:5080 --ring 2`."""

import sys

from deskphone.phone import main

sys.exit(main())
