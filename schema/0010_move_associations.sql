-- 0010: parallel C-MOVE to a destination.
-- move_associations: how many associations pacs-dicomd may open at once to this AE to carry
-- the C-STORE sub-operations of one C-MOVE (1 = one after another over one association, the
-- classic behaviour every peer accepts). Raise it for destinations that serve several
-- associations in parallel (most PACS and workstations do): a large study then arrives in a
-- fraction of the time. A destination that refuses or leaves an extra association unanswered
-- still gets everything over the ones it accepted.
ALTER TABLE modalities
    ADD COLUMN move_associations smallint NOT NULL DEFAULT 1
        CHECK (move_associations BETWEEN 1 AND 16);
