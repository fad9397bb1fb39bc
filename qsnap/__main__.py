from qsnap.cli import main

raise SystemExit(main())
