-- Orthanc: honour the rejection notes ddn-node sends when it supersedes its results.
--
-- IHE IOCM: a Key Object Selection whose Document Title is a rejection code (PS3.16 CID
-- 7010) withdraws the instances it references. Orthanc 1.10 stores such a note as a plain
-- KO; this script applies it, for notes that come from the node and for objects the node
-- made (Manufacturer's Model Name "ddn-node"), and nothing else: a rejection note cannot
-- remove anyone's images. The note itself is kept, as the record of the withdrawal.

local NODE_AET = 'DDN_NODE'
local REJECTION = { ['113001'] = true, ['113037'] = true, ['113039'] = true }

function OnStoredInstance(instanceId, tags, metadata, origin)
  if tags['Modality'] ~= 'KO' or origin == nil or origin['RemoteAet'] ~= NODE_AET then
    return
  end
  local title = tags['ConceptNameCodeSequence']
  if title == nil or title[1] == nil or title[1]['CodingSchemeDesignator'] ~= 'DCM'
      or not REJECTION[title[1]['CodeValue']] then
    return
  end
  for _, study in ipairs(tags['CurrentRequestedProcedureEvidenceSequence'] or {}) do
    for _, series in ipairs(study['ReferencedSeriesSequence'] or {}) do
      for _, ref in ipairs(series['ReferencedSOPSequence'] or {}) do
        for _, hit in ipairs(ParseJson(RestApiPost('/tools/lookup', ref['ReferencedSOPInstanceUID']))) do
          if hit['Type'] == 'Instance' then
            local made = ParseJson(RestApiGet('/instances/' .. hit['ID'] .. '/simplified-tags'))
            if made['ManufacturerModelName'] == 'ddn-node' then
              print('ddn-node: withdrawing superseded ' .. ref['ReferencedSOPInstanceUID'])
              RestApiDelete('/instances/' .. hit['ID'])
            end
          end
        end
      end
    end
  end
end
