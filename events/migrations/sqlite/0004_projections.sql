-- Projections' registry: which generation of a projection's tables queries read, who runs it
-- (a lease, renewed by every commit), a rebuild in progress, and a poison event's failure.
CREATE TABLE projections (
    name        TEXT   PRIMARY KEY,
    generation  BIGINT NOT NULL,
    building    BIGINT NOT NULL DEFAULT 0,
    owner       TEXT   NOT NULL DEFAULT '',
    lease_until BIGINT NOT NULL DEFAULT 0,
    failure     TEXT   NOT NULL DEFAULT ''
);

-- How far each generation of a projection has applied the log; moved in the same transaction
-- as the rows it wrote.
CREATE TABLE projection_positions (
    name       TEXT   NOT NULL,
    generation BIGINT NOT NULL,
    position   BIGINT NOT NULL,
    PRIMARY KEY (name, generation)
);
