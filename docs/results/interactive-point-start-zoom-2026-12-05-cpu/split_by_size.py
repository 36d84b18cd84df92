# Split the robot's per-object CSV by object size (>= 2,000 voxels of 3 mm: large organs). Usage: python split_by_size.py interactive_objects.csv
import csv,sys,numpy as np
for f in sys.argv[1:]:
    rows=list(csv.DictReader(open(f)))
    dk=[k for k in rows[0] if k.startswith('dice_')]
    for name,sel in (('all',lambda r:True),('large',lambda r:int(r['voxels'])>=2000),('small',lambda r:int(r['voxels'])<2000)):
        rs=[r for r in rows if sel(r)]
        print(f.split('/')[-2],name,len(rs),' '.join(f"{np.mean([float(r[k]) for r in rs]):.3f}" for k in dk))
