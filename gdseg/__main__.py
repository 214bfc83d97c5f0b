from gdseg.cli import main

raise SystemExit(main())
